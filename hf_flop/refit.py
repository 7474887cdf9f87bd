"""The least-squares math of one-shot reconstruction: refit a linear layer to what it computed before.

A linear layer computes ``y = W x + b``. After pruning it may read only the input features ``S``
(the consumer of removed heads or FFN rows) and hold only ``r`` rank-1 components (level
``"rank"``). Its reference is what the dense layer computed on the same inputs, ``W x + b``; the
refit minimises ``E ||W x + b - (W' x_S + b')||^2 + lambda ||W'||^2`` over the calibration tokens:

* **columns** (ridge least squares): ``W'_S = [W, b] M[:, S] (M[S, S] + lambda I)^-1`` with
  ``M = E[x^ x^T]`` the second moment of the input augmented by a constant 1 (``x^ = [x; 1]``). The
  removed columns' average contribution lands in the kept ones, and, when the layer has a bias,
  jointly in ``b'`` (FLAP's bias compensation is the special case that keeps ``W_S``);
* **rank** (activation-aware truncation): among rank-``r`` maps the best is the truncated SVD of
  ``W'_S`` *whitened* by the input covariance ``Sigma_S = L L^T``: ``W'_r = [W'_S L]_r L^-1`` (the
  error splits into the least-squares residual plus ``||(W'_S - W'_r) L||_F^2``). With a bias the
  covariance is centred and ``b' = E[y] - W'_r E[x_S]``.

Only second moments are kept (``Moments``, ``(d+1) x (d+1)`` per layer), never the activations. The
same moments measure any candidate's error on held-out tokens (``output_error``), which is how the
reconstruction decides whether a refit generalises. Everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Moments:
    """Running ``E[x^ x^T]`` of an input ``x`` (last dim ``d``) augmented by a constant 1, over tokens."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.sum = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add the tokens of ``x`` (``(..., d)``); ``weights`` (``x.shape[:-1]``, 0/1) drops padding tokens."""
        x = x.reshape(-1, self.dim).float()
        if weights is not None:
            keep = weights.reshape(-1).to(device=x.device) != 0
            x = x[keep]
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        # one batch in float32 (fast), the running sum over batches in float64 (no drift)
        self.sum += (x.t() @ x).to(device=self.sum.device, dtype=torch.float64)
        self.tokens += len(x)

    def matrix(self) -> torch.Tensor:
        """``E[x^ x^T]``; the last row and column hold ``E[x]`` and 1."""
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer.")
        return self.sum / self.tokens


@dataclass
class Fit:
    """A refit layer: ``weight`` (out x d, zero outside the kept columns) and ``bias`` (None: no bias)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    rank: int | None = None
    p: torch.Tensor | None = None  # (out x r) with p @ q == weight, for rank fits
    q: torch.Tensor | None = None  # (r x d)


def _ridge(block: torch.Tensor, ridge: float) -> torch.Tensor:
    """``block + ridge * mean(diag) * I``: ``ridge`` is relative, so it means the same at every input scale."""
    damped = block.clone()  # one copy, damped on its diagonal: no d x d identity and sum beside it
    damped.diagonal().add_(ridge * block.diagonal().mean().clamp_min(1e-12))
    return damped


def _rising_dampings(ridge: float) -> tuple[float, ...]:
    """``ridge``, then tenfold steps from at least 1e-6 up to 0.1: what a singular fit tries next."""
    return (ridge, *(max(ridge, 1e-6) * 10**k for k in range(1, 6)))


def _damped_cholesky(block: torch.Tensor, ridge: float) -> torch.Tensor:
    """The Cholesky factor of ``_ridge(block, ridge)``, the damping raised tenfold until it factors.

    A covariance estimated from few tokens, or with features that barely vary, can come out with
    tiny negative eigenvalues (cancellation in ``E[x x^T] - mean mean^T``) that the relative ridge
    does not cover; more damping only makes the fit a little more conservative.
    """
    for damping in _rising_dampings(ridge):
        chol, info = torch.linalg.cholesky_ex(_ridge(block, damping))
        if int(info) == 0:
            return chol
    raise ValueError(
        "the calibration inputs' covariance is not positive definite even with a relative ridge of 0.1; the "
        "calibration data is degenerate (too few tokens, or constant features): pass more varied batches."
    )


def _damped_solve(gram: torch.Tensor, n: int, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``gram^-1 rhs`` with ``_ridge`` on the first ``n`` rows and columns, raised tenfold while it is singular.

    With ``ridge=0`` (exact refits) and features that repeat or never vary, the Gram matrix is
    singular; as in ``_damped_cholesky``, a little damping picks one of the equally good fits.
    """
    for damping in _rising_dampings(ridge):
        damped = gram.clone()  # ``_ridge`` on the first n rows and columns, in place on the one copy
        damped.diagonal()[:n].add_(damping * gram.diagonal()[:n].mean().clamp_min(1e-12))
        solved, info = torch.linalg.solve_ex(damped, rhs)
        if int(info) == 0 and bool(torch.isfinite(solved).all()):
            return solved
    raise ValueError(
        "the calibration inputs' second moments are singular even with a relative ridge of 0.1; the calibration "
        "data is degenerate (too few tokens, or constant features): pass more varied batches."
    )


def fit_columns(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    moments: torch.Tensor,
    keep: torch.Tensor,
    *,
    fit_bias: bool,
    ridge: float = 1e-3,
) -> Fit:
    """The ridge least-squares refit of ``W x + b`` from the kept input features ``keep`` (bool, ``d``).

    ``fit_bias`` lets the bias move (a layer without a bias then gets one); otherwise ``b`` stays.
    """
    out_f, dim = weight.shape
    w = weight.to(torch.float64)
    b = bias.to(torch.float64) if bias is not None else torch.zeros(out_f, dtype=torch.float64, device=w.device)
    target = torch.cat([w, b[:, None]], dim=1)  # (out, d+1): y = target @ x^
    kept = keep.nonzero().squeeze(1).to(w.device)
    if len(kept) == 0 and not fit_bias:  # nothing left to refit: the layer adds only its bias
        return Fit(torch.zeros_like(w), b if bias is not None else None)
    cols = torch.cat([kept, torch.tensor([dim], device=w.device)]) if fit_bias else kept
    n = len(kept)
    rhs = target @ moments[:, cols]  # E[y z^T]
    if not fit_bias:  # the fixed bias is not for the kept columns to explain
        rhs = rhs - b[:, None] * moments[dim, cols][None, :]
    solved = _damped_solve(moments[cols[:, None], cols], n, rhs.t(), ridge).t()  # rhs @ gram^-1 (gram symmetric)
    new_w = torch.zeros_like(w)
    new_w[:, kept] = solved[:, :n]
    new_b = solved[:, n] if fit_bias else (b if bias is not None else None)
    return Fit(new_w, new_b)


def fit_rank(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    moments: torch.Tensor,
    keep: torch.Tensor,
    rank: int,
    *,
    fit_bias: bool,
    ridge: float = 1e-3,
) -> Fit:
    """The best rank-``rank`` refit of ``W x + b`` from the kept input features (whitened truncated SVD)."""
    full = fit_columns(weight, bias, moments, keep, fit_bias=fit_bias, ridge=ridge)
    kept = keep.nonzero().squeeze(1).to(full.weight.device)
    dim = weight.shape[1]
    second = moments[kept[:, None], kept]
    mean = moments[kept, dim]
    cov = second - mean[:, None] * mean[None, :] if fit_bias else second  # a free bias absorbs the mean
    chol = _damped_cholesky(cov, ridge)
    w_s = full.weight[:, kept]
    u, s, vh = torch.linalg.svd(w_s @ chol, full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    p = u[:, :r] * root
    # q_s = (root * vh_r) @ chol^-1, i.e. chol^T q_s^T = (root * vh_r)^T: one triangular solve
    q_s = torch.linalg.solve_triangular(chol.t(), (root[:, None] * vh[:r]).t(), upper=True).t()
    q = torch.zeros(r, dim, dtype=torch.float64, device=p.device)
    q[:, kept] = q_s
    new_w = p @ q
    new_b = full.bias
    if fit_bias:  # re-centre: the truncation moved the mean output
        y_mean = weight.to(torch.float64) @ moments[:dim, dim] + (bias.to(torch.float64) if bias is not None else 0.0)
        new_b = y_mean - new_w @ moments[:dim, dim]
    return Fit(new_w, new_b, rank=r, p=p, q=q)


def output_error(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    reference_weight: torch.Tensor,
    reference_bias: torch.Tensor | None,
    moments: torch.Tensor,
) -> float:
    """``E ||(W x + b) - (W_ref x + b_ref)||^2`` per token, from the second moments (no activations)."""
    out_f = weight.shape[0]
    zeros = torch.zeros(out_f, dtype=torch.float64, device=moments.device)
    a = torch.cat([weight.to(torch.float64), (bias.to(torch.float64) if bias is not None else zeros)[:, None]], 1)
    r = torch.cat(
        [
            reference_weight.to(torch.float64),
            (reference_bias.to(torch.float64) if reference_bias is not None else zeros)[:, None],
        ],
        1,
    )
    diff = a - r
    return float(((diff @ moments) * diff).sum().clamp_min(0.0))
