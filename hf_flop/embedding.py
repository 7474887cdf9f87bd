"""Level "embedding": the input embedding (and a tied LM head) as gated low-rank vocabulary clusters.

As in FLOP's adaptive embeddings, frequent tokens may keep more rank than rare ones: the vocabulary
is permuted by token frequency (``order``, most frequent first) and cut into clusters at
``FlopConfig.embedding_cutoffs``. Cluster ``c`` (tokens ``order[start_c:end_c]``, ``n_c`` of them)
gets ``E_c = P_c diag(z_c) Q_c`` from the SVD of its embedding rows, with its own rank gate ``z_c``
over ``min(n_c, d)`` components, so the layer starts exactly as the original embedding.

A tied LM head (its weight *is* the embedding's) is replaced by a ``TiedFactorizedHead`` that
computes the logits with the same gated clusters; an untied head is left alone (target it with
``target_modules`` for level "rank" like any linear).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .counting import (
    compacted_count,
    expected_kept_count,
    factorized_params,
    kept_unit_indices,
    stays_factorized,
    svd_factors,
)
from .gated import Compacted, Cut, GatedLayer, GatedUnits, ModuleSparsity
from .gates import Gate
from .modeling.factorized_embedding import TiedFactorizedHead, cluster_logits, cluster_lookup, inverse_order


def frequency_cutoffs(
    token_ids: torch.Tensor | Sequence[int], vocab_size: int, n_clusters: int
) -> tuple[list[int], list[int]]:
    """Cluster boundaries and the frequency order measured from training tokens.

    Tokens are sorted by count (most frequent first, ties by id); the cutoffs split that order so
    each cluster covers about the same share of the token occurrences (Zipf's law makes the first
    clusters small and the last large, as adaptive embeddings want). Returns ``(cutoffs, order)``
    for ``FlopConfig(embedding_cutoffs=cutoffs, embedding_order=order)``.
    """
    ids = torch.as_tensor(token_ids).flatten().long()
    if not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters!r} must be a positive integer.")
    if ids.numel() == 0:
        raise ValueError("token_ids is empty; pass the token ids of (a sample of) the training data.")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token_ids hold ids outside [0, {vocab_size}); is vocab_size the model's vocabulary size?")
    counts = torch.bincount(ids, minlength=vocab_size)
    order = torch.sort(counts, descending=True, stable=True).indices
    coverage = counts[order].cumsum(0).double() / ids.numel()
    cutoffs = []
    for k in range(1, n_clusters):
        cut = int(torch.searchsorted(coverage, k / n_clusters)) + 1
        if cutoffs and cut <= cutoffs[-1]:
            cut = cutoffs[-1] + 1
        if cut < vocab_size:
            cutoffs.append(cut)
    return cutoffs, order.tolist()


def check_cutoffs(cutoffs: Sequence[int] | None, order: Sequence[int] | None, vocab_size: int) -> list[int]:
    """Cluster starts ``[0, *cutoffs]`` after checking them (and the order) against the vocabulary size."""
    cutoffs = list(cutoffs or [])
    if any(not isinstance(c, int) or c <= 0 for c in cutoffs) or cutoffs != sorted(set(cutoffs)):
        raise ValueError(f"FlopConfig.embedding_cutoffs={cutoffs} must be strictly increasing positive integers.")
    if cutoffs and cutoffs[-1] >= vocab_size:
        raise ValueError(
            f"FlopConfig.embedding_cutoffs={cutoffs} reaches the vocabulary size {vocab_size}; every cutoff must be "
            f"< {vocab_size} (the last cluster runs to the end). Measure them with hf_flop.embedding.frequency_cutoffs."
        )
    if order is not None and sorted(order) != list(range(vocab_size)):
        raise ValueError(
            f"FlopConfig.embedding_order must be a permutation of range({vocab_size}) (token ids, most frequent "
            "first), as returned by hf_flop.embedding.frequency_cutoffs."
        )
    return [0, *cutoffs]


class FlopEmbedding(nn.Module, GatedLayer):
    """Gated cluster-factorized replacement of an ``nn.Embedding``.

    Parameters ``flop_P[c]`` (n_c x r_c), ``flop_Q[c]`` (r_c x d) and gates ``flop_gates[c]``; the frozen
    ``base_layer`` keeps the original embedding (for unloading). ``order``: the token permutation.
    Each cluster is one report entry (``<name>.cluster_<c>``) and one gate (``<name>.embedding_<c>``).
    """

    supersedes_base_weight = True

    def __init__(
        self,
        base_layer: nn.Embedding,
        starts: list[int],
        order: Sequence[int] | None,
        gate_factory: Callable[[int], Gate],
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_embeddings, self.hidden = base_layer.weight.shape
        self.embedding_dim = self.hidden
        self.order = None if order is None else list(order)
        self.register_buffer("position", inverse_order(self.order, self.num_embeddings), persistent=False)
        self.sizes = [end - start for start, end in zip(starts, [*starts[1:], self.num_embeddings])]
        weight = base_layer.weight.detach()
        permuted = weight if order is None else weight[torch.as_tensor(order, device=weight.device)]
        self.flop_P, self.flop_Q, self.flop_gates = nn.ParameterList(), nn.ParameterList(), nn.ModuleList()
        for start, size in zip(starts, self.sizes):
            p, q = svd_factors(permuted[start : start + size])
            self.flop_P.append(nn.Parameter(p))
            self.flop_Q.append(nn.Parameter(q))
            self.flop_gates.append(gate_factory(q.shape[0]).to(weight.device))
        base_layer.weight.requires_grad_(False)  # superseded by the factors

    def factors(self, deterministic: bool = False):
        """Per cluster ``(P diag(z), Q)``: sampled gates in training, eval masks otherwise (or if asked).

        The gates are float32; ``z`` takes the factors' dtype so a bf16/fp16 model computes in its own.
        """
        return [
            (p * (g.deterministic_mask() if deterministic else g()).to(p.dtype), q)
            for p, q, g in zip(self.flop_P, self.flop_Q, self.flop_gates)
        ]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return cluster_lookup(self.position[input_ids], self.factors(), self.hidden)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return cluster_logits(hidden_states, self.factors(), self.position)

    @torch.no_grad()
    def folded_weight(self) -> torch.Tensor:
        """The ``(vocab, d)`` matrix the eval masks give, in token-id order."""
        permuted = torch.cat([p @ q for p, q in self.factors(deterministic=True)])
        return permuted[self.position]

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, hidden={self.hidden}, clusters={self.sizes}"

    # --- the gated-layer verbs (hf_flop.gated) ---------------------------------------------------------
    def gates(self) -> dict[str, Gate]:
        return {f"embedding_{c}": gate for c, gate in enumerate(self.flop_gates)}

    def count(self, kept_in, kept_out, *, deterministic: bool, round_to: int) -> dict[str, ModuleSparsity]:
        """One entry per cluster ``E_c = P_c diag(z_c) Q_c`` (``(n_c, d)``, factorized or dense); head/row
        gates do not reach the embedding, so ``kept_in`` / ``kept_out`` are ignored."""
        entries = {}
        for c, (size, gate) in enumerate(zip(self.sizes, self.flop_gates)):
            n, d = torch.tensor(float(size)), torch.tensor(float(self.hidden))
            rank = gate.l0(deterministic)
            if deterministic:
                rank = torch.tensor(compacted_count(int(rank), gate.n, round_to))
            else:
                rank = expected_kept_count(rank)
            params, factorized = factorized_params(rank, n, d, deterministic=deterministic)
            kept_rank = int(rank) if deterministic else rank
            entries[f".cluster_{c}"] = ModuleSparsity(
                (size, self.hidden), (size, self.hidden), gate.n, kept_rank, params, factorized
            )
        return entries

    @torch.no_grad()
    def compact(self, cut: Cut) -> Compacted:
        """Each cluster cut to its kept rank: ``rows`` (n_c x r) and ``proj`` (r x d), or dense ``rows``."""
        clusters, tensors = [], {}
        dtype = self.base_layer.weight.dtype
        for c, (p, q, gate) in enumerate(zip(self.flop_P, self.flop_Q, self.flop_gates)):
            z = gate.deterministic_mask().detach().float().cpu()
            rank = compacted_count(int((z != 0).sum()), len(z), cut.round_to)
            comps = kept_unit_indices(z, rank)
            rows = p.detach().float().cpu()[:, comps] * z[comps]
            proj = q.detach().float().cpu()[comps]
            size = rows.shape[0]
            if stays_factorized(rank, self.hidden, size):
                clusters.append({"size": size, "rank": rank})
                tensors[f"clusters.{c}.rows"] = rows.to(dtype).contiguous()
                tensors[f"clusters.{c}.proj"] = proj.to(dtype).contiguous()
            else:
                clusters.append({"size": size, "rank": None})
                tensors[f"clusters.{c}.rows"] = (rows @ proj).to(dtype).contiguous()
        tensors["position"] = self.position.detach().cpu().clone()
        spec = {"kind": "factorized_embedding", "hidden": self.hidden, "clusters": clusters, "order": self.order}
        return Compacted(spec, tensors)

    def scored_units(self, name: str) -> list[GatedUnits]:
        """Rank components of each cluster. A token of cluster c reads row ``P_c[t]``, so its features are
        ``P_c[t, k]`` (0 for other tokens) and ``Q_c[k]`` is the consumer: the activation score weighs
        clusters by how often their tokens occur in the calibration data. A tied head's use of the same
        clusters is left out of it."""
        found, start = [], 0
        for c, (p, q, gate) in enumerate(zip(self.flop_P, self.flop_Q, self.flop_gates)):
            p, q = p.detach(), q.detach()
            found.append(
                GatedUnits(
                    key=f"{name}.embedding_{c}",
                    level="embedding",
                    gate=gate,
                    n_units=q.shape[0],
                    unit=1,
                    unit_params=p.shape[0] + self.hidden,
                    observed=self,
                    column_sq_norms=q.float().pow(2).sum(1),
                    row_sq_norms=p.float().pow(2).sum(0),
                    features=functools.partial(_cluster_rows, self.position, p, start),
                    entry=f"{name}.cluster_{c}",
                    module=name,
                )
            )
            start += p.shape[0]
        return found

    @torch.no_grad()
    def unload(self, model: nn.Module, merge: bool) -> None:
        """Put plain ``nn.Embedding`` (and a tied ``nn.Linear`` head) back, with the folded weight if ``merge``."""
        base = self.base_layer
        if merge:
            base.weight.data.copy_(self.folded_weight())
        model.set_input_embeddings(base)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(head, FlopTiedHead):
            linear = nn.Linear(self.hidden, self.num_embeddings, bias=head.bias is not None, device=base.weight.device)
            linear.weight = base.weight
            if head.bias is not None:
                linear.bias = head.bias
            model.set_output_embeddings(linear)


class FlopTiedHead(TiedFactorizedHead, GatedLayer):
    """The LM head of a model whose tied embedding is a ``FlopEmbedding``: logits from the same gated clusters.

    It has no gates or weight of its own; compaction writes a ``tied_embedding_head`` entry that ties
    the compacted head to the compacted embedding again.
    """

    def count(self, kept_in, kept_out, *, deterministic: bool, round_to: int) -> dict[str, ModuleSparsity]:
        return {}  # its weight is the embedding's, counted there

    @torch.no_grad()
    def compact(self, cut: Cut) -> Compacted:
        embedding = self._tied[0]
        spec = {
            "kind": "tied_embedding_head",
            "embedding": cut.path_of(embedding),
            "vocab": embedding.num_embeddings,
            "bias": self.bias is not None,
        }
        tensors = {"bias": self.bias.detach().clone()} if self.bias is not None else {}
        # the head ties itself to the embedding on load; nothing is left for transformers to tie
        return Compacted(spec, tensors, config={"tie_word_embeddings": False})


def _tied_head(model: nn.Module, embedding: nn.Module) -> nn.Module | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if head is not None and getattr(head, "weight", None) is embedding.weight else None


def check_embedding_level(model: nn.Module, config, targets: list[str]) -> None:
    """Clear errors, before anything is replaced, for a model or config level "embedding" cannot handle."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(
            f"level 'embedding' needs an nn.Embedding input embedding, but {type(model).__name__} has "
            f"{type(embedding).__name__}; a model whose embedding was already factorized cannot be pruned at this level again."
        )
    check_cutoffs(config.embedding_cutoffs, config.embedding_order, embedding.num_embeddings)
    head = _tied_head(model, embedding)
    if head is not None and any(module is head for name, module in model.named_modules() if name in targets):
        raise ValueError(
            "the LM head is tied to the input embedding, so it cannot also be a target of level 'rank' when "
            "level 'embedding' is on; remove it from target_modules (the embedding gates prune it too)."
        )


def inject_embedding(model: nn.Module, config, gate_factory: Callable[[int], Gate]) -> tuple[FlopEmbedding, FlopTiedHead | None]:
    """Replace ``model``'s input embedding (and a tied output embedding) with the gated versions."""
    embedding = model.get_input_embeddings()
    starts = check_cutoffs(config.embedding_cutoffs, config.embedding_order, embedding.num_embeddings)
    head = _tied_head(model, embedding)
    tied = head is not None
    flop_embedding = FlopEmbedding(embedding, starts, config.embedding_order, gate_factory)
    model.set_input_embeddings(flop_embedding)
    new_head = None
    if tied:
        new_head = FlopTiedHead(head.bias if getattr(head, "bias", None) is not None else False)
        new_head.tie_to(flop_embedding)
        model.set_output_embeddings(new_head)
    return flop_embedding, new_head


def _cluster_rows(position: torch.Tensor, p: torch.Tensor, start: int, input_ids: torch.Tensor) -> torch.Tensor:
    pos = position[input_ids]
    inside = (pos >= start) & (pos < start + p.shape[0])
    out = p.new_zeros(*input_ids.shape, p.shape[1])
    out[inside] = p[pos[inside] - start]
    return out
