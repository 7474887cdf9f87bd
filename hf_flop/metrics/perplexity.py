"""Perplexity from summed token losses, as an offline ``evaluate`` metric module.

Unlike the Hub's ``perplexity`` (which loads a model itself), this one takes what an evaluation
loop already has: per batch, the summed negative log-likelihood (natural log) and the number of
predicted tokens. Perplexity is ``exp(sum(nll) / sum(n_tokens))``, i.e. per token over the whole
set, independent of how the set was batched. Self-contained (imports only ``datasets``,
``evaluate``, ``math``) so ``evaluate.load`` can load it by path with no Hub access.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Per-token perplexity exp(total NLL / total tokens) from summed losses."
_KWARGS = """
Args:
    nll (list of float): summed negative log-likelihood (natural log) of each batch or sequence.
    n_tokens (list of int): number of predicted tokens behind each nll entry.
Returns:
    perplexity (float), mean_nll (float, nats per token), n_tokens (int)
"""


class Perplexity(evaluate.Metric):
    """Token-level perplexity, computed locally from losses."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"nll": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, n_tokens) -> dict:
        total = sum(n_tokens)
        if total <= 0:
            raise ValueError("perplexity needs at least one predicted token; n_tokens sums to 0.")
        mean_nll = sum(nll) / total
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "n_tokens": int(total)}
