"""The cluster-factorized embedding of models compacted after level "embedding", and its tied LM head.

This file is copied next to the weights as remote code, so it imports only ``torch``.

The vocabulary is split into clusters of a token permutation ``order`` (most frequent first):
cluster ``c`` holds the tokens ``order[start_c : start_c + n_c]``. Its embedding rows are either a
dense ``n_c x d`` matrix or ``rows (n_c x r_c) @ proj (r_c x d)``, whichever is smaller. A tied
LM head computes its logits with the same matrices: per cluster ``(h proj^T) rows^T``, then the
columns are put back in token-id order. The functions ``cluster_lookup`` and ``cluster_logits`` are
shared with the gated layer of ``hf_flop.embedding``, which passes its gated factors.
"""

from __future__ import annotations

import torch
from torch import nn

# per cluster: (rows, proj) with rows (n_c x r) and proj (r x d), or (rows, None) with rows (n_c x d)
Factors = list[tuple[torch.Tensor, torch.Tensor | None]]


def cluster_lookup(positions: torch.Tensor, factors: Factors, hidden: int) -> torch.Tensor:
    """Embedding vectors of tokens at ``positions`` (their index in the frequency order)."""
    first = factors[0][0]
    out = first.new_zeros(*positions.shape, hidden)
    start = 0
    for rows, proj in factors:
        sel = (positions >= start) & (positions < start + rows.shape[0])
        picked = rows[positions[sel] - start]
        out[sel] = picked @ proj if proj is not None else picked
        start += rows.shape[0]
    return out


def cluster_logits(hidden_states: torch.Tensor, factors: Factors, position: torch.Tensor) -> torch.Tensor:
    """``hidden_states @ E^T`` with ``E`` given by its clusters; ``position[t]`` is token t's place in the order."""
    h = hidden_states.to(factors[0][0].dtype)
    parts = [(h @ proj.t()) @ rows.t() if proj is not None else h @ rows.t() for rows, proj in factors]
    return torch.cat(parts, dim=-1).index_select(-1, position)


def inverse_order(order: list[int] | None, vocab: int) -> torch.Tensor:
    """``position`` with ``position[order[i]] = i`` (identity when ``order`` is None)."""
    if order is None:
        return torch.arange(vocab)
    position = torch.empty(vocab, dtype=torch.long)
    position[torch.as_tensor(order, dtype=torch.long)] = torch.arange(vocab)
    return position


class EmbeddingCluster(nn.Module):
    """One vocabulary cluster: ``rows`` (n x r) and ``proj`` (r x d), or dense ``rows`` (n x d) when ``rank`` is None."""

    def __init__(self, size: int, hidden: int, rank: int | None) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.empty(size, rank if rank is not None else hidden))
        self.proj = nn.Parameter(torch.empty(rank, hidden)) if rank is not None else None


class FactorizedEmbedding(nn.Module):
    """A vocabulary embedding stored as per-cluster low-rank (or dense) matrices.

    ``clusters`` is a list of ``{"size": n_c, "rank": r_c or None}``; ``order`` the token permutation
    (None: token ids in order). Parameters: exactly ``sum_c r_c (n_c + d)`` or ``n_c d`` per cluster.
    """

    def __init__(self, clusters: list[dict], hidden: int, order: list[int] | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.num_embeddings = sum(c["size"] for c in clusters)
        self.embedding_dim = hidden
        self.clusters = nn.ModuleList(EmbeddingCluster(c["size"], hidden, c["rank"]) for c in clusters)
        # saved with the weights: loading may build modules on the meta device, where a computed buffer is lost
        self.register_buffer("position", inverse_order(order, self.num_embeddings))

    def factors(self) -> Factors:
        return [(c.rows, c.proj) for c in self.clusters]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return cluster_lookup(self.position[input_ids], self.factors(), self.hidden)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return cluster_logits(hidden_states, self.factors(), self.position)


class TiedFactorizedHead(nn.Module):
    """An LM head tied to a cluster embedding: ``logits = h E^T (+ bias)``, with no weight of its own.

    The embedding is held outside the module tree (``tie_to``), so its parameters are saved once.
    """

    def __init__(self, bias: nn.Parameter | bool = False, vocab: int | None = None) -> None:
        super().__init__()
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        else:
            self.bias = nn.Parameter(torch.zeros(vocab)) if bias else None
        self._tied: list[nn.Module] = []

    def tie_to(self, embedding: nn.Module) -> None:
        """Use ``embedding`` (anything with ``logits(h)``) as the weight."""
        self._tied[:] = [embedding]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._tied:
            raise RuntimeError("TiedFactorizedHead is not tied to an embedding; call tie_to(embedding) first.")
        logits = self._tied[0].logits(hidden_states)
        return logits + self.bias if self.bias is not None else logits
