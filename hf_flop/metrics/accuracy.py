"""Accuracy as an offline ``evaluate`` metric module.

Self-contained on purpose (imports only ``datasets`` and ``evaluate``): ``evaluate.load`` copies
this file into its module cache and imports it from there, so it can be loaded by path with no
Hub access, e.g. ``evaluate.load(hf_flop.metrics.metric_path("accuracy"))``.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference label."
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return a fraction (True, default) or the number of correct predictions.
Returns:
    accuracy (float or int)
"""


class Accuracy(evaluate.Metric):
    """Classification accuracy, computed locally."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize: bool = True) -> dict:
        if len(predictions) == 0:
            raise ValueError("accuracy needs at least one prediction; got none.")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(predictions) if normalize else correct}
