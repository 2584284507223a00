"""One-layer factorisations ``W [N, K] ~ U diag(S) V`` fed by calibration statistics.

:func:`factorize` turns an ``nn.Linear`` (``y = x W^T + b``, ``K`` inputs, ``N`` outputs) into a
:class:`~lrcomp.layers.LowRankLinear` whose ``r`` directions come sorted by a per-direction
``importance`` (fp32 ``[r]``, non-negative, descending): the reduction of the method's objective
when the direction is kept, which the global rank allocator compares across layers.

Every method solves ``min_{rank(W_r) <= r} ||D_out (W - W_r) D_in||_F^2`` for some invertible
weighting ``D_out [N, N]``, ``D_in [K, K]`` (or, for "jactus_union", the same problem restricted to a
subspace) by one SVD ``D_out W D_in = U' Sigma V'^T`` (Eckart-Young), and returns

    U = D_out^{-1} U'_r,   S = Sigma_r,   V = V'_r^T D_in^{-1},   importance = Sigma_r^2

so ``U diag(S) V`` is the method's rank-r approximation, ``rank=None`` (``r = min(K, N)``) gives W back,
and ``|S|`` orders the directions like ``importance`` (so ``LowRankLinear.prune_`` agrees with it).
All arithmetic is fp64 on the weight's device; the factors are cast to the weight's dtype at the end.

Statistics (one layer's dict, as ``lrcomp.calibrate`` returns them per layer; fp64, any device):
``"input_cov"`` ``[K, K]`` = ``(1/T) sum_t x_t x_t^T``; ``"grad_cov"`` ``[N, N]`` = ``(1/T) sum_t g_t g_t^T``
with ``g_t = dL/dy_t``; ``"input_abs_mean"`` ``[K]`` = ``(1/T) sum_t |x_t|``; ``"fisher"`` ``[K]`` =
per-input-column mean squared weight gradient ``sum_n (dL/dW[n, k])^2`` averaged over batches.

Methods (``D = diag``):

* ``"svd"``: ``D_out = I, D_in = I``; importance ``s_i^2`` = reduction of ``||W - W_r||_F^2``.
* ``"asvd"`` (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing
  Large Language Models"): ``D_in = D(a^alpha)`` with ``a`` = input_abs_mean (zeros clamped to
  ``min_scale * max(a)``, and ``a^alpha`` clamped again at ``min_scale * max(a^alpha)``, so that for
  ``alpha > 1`` too the weighting spans at most ``1 / min_scale``), option ``alpha`` (default 0.5).
  Importance: ``sigma_i^2`` of ``W D_in``, the reduction of ``||(W - W_r) D_in||_F^2``; it is a proxy of the
  output error (exact only when the input channels are independent with RMS proportional to ``a^alpha``),
  so it compares across layers only approximately.
* ``"svd_llm"`` (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for Large
  Language Model Compression"): ``D_in = L`` with ``input_cov = L L^T`` (Cholesky, fp64, eigenvalue shift
  when not positive definite: :func:`lrcomp.linalg.whiten.shifted_cholesky`, option ``shift_eps``).
  Since ``E_x ||x W^T - x W_r^T||^2 = tr((W - W_r) C (W - W_r)^T) = ||(W - W_r) L||_F^2``, the result is
  the exact minimiser of the per-token output error (the closed form ``W_r^T = R^{-1} [R W^T]_r`` for
  ``X = Q R``) and ``importance = sigma_i^2(W L)`` is the exact reduction of that error per token.
  ``V = V'_r^T L^{-1}`` is computed by a triangular solve.
* ``"fwsvd"`` (Hsu et al. 2022, "Language model compression with weighted low-rank factorization"):
  ``D_in = D(sqrt(f))`` with ``f`` = fisher (zeros clamped to ``min_scale * max(f)``): minimises
  ``sum_k f_k ||W[:, k] - W_r[:, k]||^2``. The paper sums the Fisher information along each *row* of W
  (one weight per output); the statistic here is per *input column* (as the issue specifies), so the
  columns are weighted. Importance ``sigma_i^2(W D_in)``.
* ``"sparsity_aware"`` (Ren & Zhu 2023, "Low-Rank Prune-And-Factorize for Language Model Compression",
  LPAF's sparsity-aware SVD initialisation): element importance ``M [N, K] >= 0`` from, in order, the
  option ``importance`` (e.g. accumulated movement scores), the option ``weight_grad`` (``M = |W * dW|``,
  first-order importance), the ``"fisher"`` statistic (``M = |W| sqrt(f_k / N)``, the RMS of the first-order
  term ``|W dW|`` with ``E[dW_nk^2] ~ f_k / N``), else ``M = |W|``. The weighted problem
  ``min sum_nk M_nk (W - W_r)_nk^2`` has no closed form; ``M`` is replaced by the rank-1 matrix with the
  same row and column sums, ``M_hat = a b^T / sum(M)`` (``a`` row sums, ``b`` column sums), which makes it
  ``||D(sqrt(a)) (W - W_r) D(sqrt(b / sum(M)))||_F^2``, solved exactly by one SVD (exact when ``M`` is
  rank 1). Importance ``sigma_i^2`` = reduction of ``sum M_hat (W - W_r)^2``.

  Option ``input_metric`` (default False; not in the method as published) keeps the row weights ``a`` and
  measures each row's error in the metric of the inputs instead of the column weights:
  ``sum_n a_n (W - W_r)_n C' (W - W_r)_n^T = ||D(sqrt(a)) (W - W_r) L'||_F^2`` with ``C' = input_cov / tr(input_cov)
  = L' L'^T`` (Cholesky, shifted like svd_llm's; trace 1 like ``b / sum(M)``, so the importances keep the
  units of the plain method, and a diagonal ``C'`` proportional to ``b`` gives the plain method back). This is
  svd_llm's whitening with the rows weighted by how much the loss depends on them; it needs ``input_cov``.
* ``"jactus_union"`` (JACTUS): the approximation is confined to a union of subspaces. Input side:
  ``P_in`` = orthonormal basis of the top ``ceil(weight_frac r)`` right singular vectors of W united with
  the top ``ceil(input_frac r)`` eigenvectors of input_cov; output side: ``P_out`` = the top
  ``ceil(weight_frac r)`` left singular vectors of W united with the top ``ceil(grad_frac r)`` eigenvectors
  of grad_cov (when given). Unions are orthonormalised dropping directions dependent to ``tol``
  (:func:`lrcomp.linalg.whiten.orthonormal_union`). Then, with ``C`` = input_cov (shifted by ``delta``
  when ``C_p = P_in^T C P_in`` is not PD) and ``C_p = L_p L_p^T``:

      min_{A: rank <= r} E ||x W^T - x (P_out A P_in^T)^T||^2
        = const + ||(Z - A) L_p||_F^2,    Z = P_out^T W C P_in C_p^{-1}

  (``P_out Z P_in^T`` is the projection of W onto the union in the metric of C, the orthogonal
  projection ``P_out P_out^T W P_in P_in^T`` when ``C ~ I``), solved by the SVD of ``Z L_p``:
  ``U = P_out U'_r``, ``V = V'_r^T L_p^{-1} P_in^T``, importance ``sigma_i^2(Z L_p)`` (exact reduction of
  the per-token output error, like svd_llm). The row space of the result lies in ``span(P_in)`` and its
  column space in ``span(P_out)``; with ``weight_frac >= 1`` the union contains plain SVD's subspaces,
  so its output error is never above svd's. Note that the union depends on r: at ``rank=None`` it is the
  whole space and the method equals svd_llm.

  Option ``grad_metric`` ``b`` in [0, 1] (default 0, the above; not in the method as specified) weights the
  output error by ``H = (1 - b) I + b G / (tr(G) / N)`` with ``G`` = grad_cov (``I`` when ``G = 0``): the
  objective becomes ``E (W x - W_r x)^T H (W x - W_r x) = tr((W - W_r) C (W - W_r)^T H)``, the Kronecker-factored
  (K-FAC) proxy of the loss change when only the outputs the loss is sensitive to count. With
  ``H_p = P_out^T H P_out = R_p R_p^T`` (Cholesky, shifted like ``C_p``) the union's optimum is the SVD of
  ``A = R_p^{-1} P_out^T H W C P_in L_p^{-T}``: ``U = P_out R_p^{-T} U'_r`` (no longer orthonormal),
  ``V = V'_r^T L_p^{-1} P_in^T``, importance ``sigma_i^2(A)`` (the exact reduction of the weighted error;
  ``G`` is scaled to mean eigenvalue 1, so the allocator compares layers in the units of ``b = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lrcomp.layers.lowrank_linear import LowRankLinear, _check_rank
from lrcomp.linalg.whiten import orthonormal_union, shifted_cholesky, top_eigenvectors

FACTORIZATIONS = ("svd", "asvd", "svd_llm", "fwsvd", "sparsity_aware", "jactus_union")

REQUIRED_STATS: dict[str, tuple[str, ...]] = {
    "svd": (),
    "asvd": ("input_abs_mean",),
    "svd_llm": ("input_cov",),
    "fwsvd": ("fisher",),
    "sparsity_aware": (),
    "jactus_union": ("input_cov",),
}

# Statistics a method uses when they are present (calibrate them too to get the full method).
OPTIONAL_STATS: dict[str, tuple[str, ...]] = {
    "svd": (),
    "asvd": (),
    "svd_llm": (),
    "fwsvd": (),
    "sparsity_aware": ("fisher",),
    "jactus_union": ("grad_cov",),
}

# Method options and their defaults; every method also takes mask_fn / temperature (LowRankLinear).
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "svd": {},
    "asvd": {"alpha": 0.5, "min_scale": 1e-6},
    "svd_llm": {"shift_eps": 1e-8},
    "fwsvd": {"min_scale": 1e-6},
    "sparsity_aware": {"importance": None, "weight_grad": None, "min_scale": 1e-6, "input_metric": False,
                       "shift_eps": 1e-8},
    "jactus_union": {"weight_frac": 1.0, "input_frac": 0.5, "grad_frac": 0.5, "tol": 1e-8, "shift_eps": 1e-8,
                     "grad_metric": 0.0},
}
_LAYER_OPTIONS = {"mask_fn": "none", "temperature": 1.0}


def required_stats(method: str, options: Mapping[str, object] | None = None) -> tuple[str, ...]:
    """The statistics ``method`` needs with ``options`` (:data:`REQUIRED_STATS`, plus ``input_cov`` for
    ``sparsity_aware`` with ``input_metric``)."""
    needed = REQUIRED_STATS[method]
    if method == "sparsity_aware" and (options or {}).get("input_metric"):
        needed = needed + ("input_cov",)
    return needed

_STAT_NAMES = ("input_cov", "grad_cov", "input_abs_mean", "fisher")


# ---------------------------------------------------------------------------- validation helpers
def _stat_shape(name: str, K: int, N: int) -> tuple[int, ...]:
    return {"input_cov": (K, K), "grad_cov": (N, N), "input_abs_mean": (K,), "fisher": (K,)}[name]


def _get_stats(stats: object, method: str, needed: tuple[str, ...], K: int, N: int,
               device: torch.device) -> dict[str, Tensor]:
    """Check ``stats`` (one layer's dict) and return the statistics the method uses (``needed`` and the
    optional ones), fp64 on ``device``."""
    if stats is None:
        stats = {}
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a dict of stat name -> tensor for one layer, got {type(stats).__name__}")
    missing = [s for s in needed if s not in stats]
    if missing:
        hint = ""
        if stats and all(isinstance(v, Mapping) for v in stats.values()):
            hint = " (stats looks like statistics of a whole model: pass one layer's entry, stats=calib[name])"
        raise ValueError(f"method {method!r} needs the statistics {needed}; stats is missing {missing}{hint}")
    out = {}
    for name in needed + OPTIONAL_STATS[method]:
        if name not in stats:
            continue
        value = stats[name]
        expected = _stat_shape(name, K, N)
        if not isinstance(value, Tensor):
            raise TypeError(f"stats[{name!r}] must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != expected:
            raise ValueError(f"stats[{name!r}] must have shape {list(expected)} for a {K}->{N} layer, "
                             f"got {list(value.shape)}")
        value = value.detach().to(device=device, dtype=torch.float64)
        if not torch.isfinite(value).all():
            raise ValueError(f"stats[{name!r}] has non-finite values (nan or inf)")
        if name in ("input_abs_mean", "fisher") and bool((value < 0).any()):
            raise ValueError(f"stats[{name!r}] must be non-negative, got min {float(value.min()):.3e}")
        if name in ("input_cov", "grad_cov"):
            asym = float((value - value.mT).abs().max())
            if asym > 1e-6 * max(float(value.abs().max()), 1e-300):
                raise ValueError(f"stats[{name!r}] must be symmetric, got max |C - C^T| = {asym:.3e}")
            value = 0.5 * (value + value.mT)
        out[name] = value
    return out


def _check_float(name: str, value: object, *, low: float, low_open: bool = False, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low) or value > high:
        lo = "(" if low_open else "["
        raise ValueError(f"{name} must be in {lo}{low}, {high}], got {value!r}")
    return value


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _positive_scale(values: Tensor, min_scale: float) -> Tensor:
    """``values >= 0`` clamped below at ``min_scale * max(values)`` (all ones when they are all zero)."""
    top = float(values.max()) if values.numel() else 0.0
    if top <= 0.0:
        return torch.ones_like(values)
    return values.clamp(min=min_scale * top)


# ---------------------------------------------------------------------------- the solvers (fp64)
def _scaled_svd(W: Tensor, row: Tensor | None, col: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD of ``D(row) W D(col)`` unscaled: ``(U, S, V, importance)`` with every direction."""
    Ws = W
    if row is not None:
        Ws = row[:, None] * Ws
    if col is not None:
        Ws = Ws * col[None, :]
    u, s, vh = torch.linalg.svd(Ws, full_matrices=False)
    if row is not None:
        u = u / row[:, None]
    if col is not None:
        vh = vh / col[None, :]
    return u, s, vh, s.square()


def _whitened_svd(W: Tensor, L: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD of ``W L`` (``L`` lower triangular): ``U = U'``, ``V = V'^T L^{-1}`` (triangular solve)."""
    u, s, vh = torch.linalg.svd(W @ L, full_matrices=False)
    v = torch.linalg.solve_triangular(L, vh, upper=False, left=False)  # v L = vh
    return u, s, v, s.square()


def _fit_dtype_range(u: Tensor, v: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``U [N, r]``, ``V [r, K]`` (fp64) rescaled so that their entries fit in ``dtype`` when one would overflow it.

    A weighting ``D_in`` puts ``1 / D_in`` into V (``V = V'^T D_in^{-1}``) and ``D_out^{-1}`` into U: in fp16
    (largest value 65504) the direction of a nearly dead input channel overflows although ``U diag(S) V``
    does not. Then column i of U and row i of V are multiplied by ``t_i`` and ``1 / t_i`` with
    ``t_i = sqrt(max|V_i,:| / max|U_:,i|)`` (equal largest entries), which leaves ``U diag(S) V``, ``S`` and
    the importance unchanged. Factors that fit are returned as they are (U orthonormal for svd / svd_llm).
    """
    limit = torch.finfo(dtype).max
    if u.numel() == 0 or max(float(u.abs().max()), float(v.abs().max())) <= limit:
        return u, v
    cu, cv = u.abs().amax(0), v.abs().amax(1)
    t = torch.where((cu > 0) & (cv > 0), (cv / cu.clamp_min(1e-300)).sqrt(), torch.ones_like(cu))
    return u * t, v / t[:, None]


def _fraction_count(frac: float, rank: int, cap: int) -> int:
    return min(cap, math.ceil(frac * rank - 1e-9))


def jactus_union_bases(
    weight: Tensor,
    rank: int,
    input_cov: Tensor,
    grad_cov: Tensor | None = None,
    *,
    weight_frac: float = 1.0,
    input_frac: float = 0.5,
    grad_frac: float = 0.5,
    tol: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """Orthonormal bases ``(P_out [N, m_out], P_in [K, m_in])`` of the JACTUS union subspaces (fp64).

    ``P_in``: top ``ceil(weight_frac * rank)`` right singular vectors of ``weight [N, K]`` united with the
    top ``ceil(input_frac * rank)`` eigenvectors of ``input_cov [K, K]``. ``P_out``: top
    ``ceil(weight_frac * rank)`` left singular vectors united with the top ``ceil(grad_frac * rank)``
    eigenvectors of ``grad_cov [N, N]`` (skipped when None). Counts are capped at the dimension; the
    weight's vectors come first.
    """
    W = weight.detach().to(torch.float64)
    N, K = W.shape
    u, _, vh = torch.linalg.svd(W, full_matrices=False)
    p = _fraction_count(weight_frac, rank, min(K, N))
    P_in = orthonormal_union(vh[:p].mT, top_eigenvectors(input_cov, _fraction_count(input_frac, rank, K)), tol=tol)
    grad = W.new_zeros(N, 0)
    if grad_cov is not None:
        grad = top_eigenvectors(grad_cov, _fraction_count(grad_frac, rank, N))
    P_out = orthonormal_union(u[:, :p], grad, tol=tol)
    return P_out, P_in


def _jactus(W: Tensor, rank: int, stats: dict[str, Tensor], opts: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    C = stats["input_cov"]
    P_out, P_in = jactus_union_bases(W, rank, C, stats.get("grad_cov"), weight_frac=opts["weight_frac"],
                                     input_frac=opts["input_frac"], grad_frac=opts["grad_frac"], tol=opts["tol"])
    m = min(P_out.shape[1], P_in.shape[1])
    if m < rank:
        raise ValueError(f"the jactus_union subspaces have dimensions {P_out.shape[1]} (output) and "
                         f"{P_in.shape[1]} (input), fewer than rank={rank}: raise weight_frac, input_frac or "
                         f"grad_frac (weight_frac={opts['weight_frac']}, input_frac={opts['input_frac']}, "
                         f"grad_frac={opts['grad_frac']})")
    CP = C @ P_in                                        # [K, m_in]
    L_p, delta = shifted_cholesky(P_in.mT @ CP, eps=opts["shift_eps"], name="input_cov projected on the union")
    beta = opts["grad_metric"]
    if beta == 0.0:
        PH, R_p = P_out.mT, None                         # H = I: P_out^T H = P_out^T, H_p = I
    else:
        H = _output_metric(stats.get("grad_cov"), beta, W.shape[0])   # [N, N]
        PH = P_out.mT @ H                                # [m_out, N]
        R_p, delta_h = shifted_cholesky(PH @ P_out, eps=opts["shift_eps"], name="output metric projected on the union")
        PH = PH + delta_h * P_out.mT                     # P_out^T (H + delta_h I), as in R_p R_p^T = H_p + delta_h I
    # A = R_p^{-1} P_out^T H W (C + delta I) P_in L_p^{-T}  (R_p = I when H = I)
    A = PH @ (W @ (CP + delta * P_in))                   # [m_out, m_in]
    A = torch.linalg.solve_triangular(L_p.mT, A, upper=True, left=False)  # X L_p^T = A
    u_out = P_out
    if R_p is not None:
        A = torch.linalg.solve_triangular(R_p, A, upper=False)            # R_p X = A
        u_out = torch.linalg.solve_triangular(R_p, P_out.mT, upper=False).mT  # (R_p^{-1} P_out^T)^T = P_out R_p^{-T}
    u, s, vh = torch.linalg.svd(A, full_matrices=False)
    v_core = torch.linalg.solve_triangular(L_p, vh, upper=False, left=False)  # vh L_p^{-1}  [m, m_in]
    return u_out @ u, s, v_core @ P_in.mT, s.square()


def _output_metric(grad_cov: Tensor | None, beta: float, N: int) -> Tensor:
    """``H = (1 - beta) I + beta G / (tr(G) / N)`` [N, N] (fp64): the output-gradient covariance scaled to mean
    eigenvalue 1, mixed with the identity; ``I`` when ``G`` is all zeros."""
    if grad_cov is None:
        raise ValueError("jactus_union option grad_metric > 0 weights the output error by grad_cov: pass it in stats")
    eye = torch.eye(N, dtype=grad_cov.dtype, device=grad_cov.device)
    mean = float(torch.diagonal(grad_cov).sum()) / N
    if mean <= 0.0:
        return eye
    G = 0.5 * (grad_cov + grad_cov.mT)
    return (1.0 - beta) * eye + (beta / mean) * G


def _sparsity_aware(W: Tensor, stats: dict[str, Tensor], opts: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    N, K = W.shape
    M = element_importance(W, fisher=stats.get("fisher"), importance=opts["importance"],
                           weight_grad=opts["weight_grad"])
    total = float(M.sum())
    if total <= 0.0:
        a, b, total = torch.ones(N, dtype=W.dtype, device=W.device), torch.ones(K, dtype=W.dtype, device=W.device), 1.0
    else:
        a = _positive_scale(M.sum(1), opts["min_scale"])
        b = _positive_scale(M.sum(0), opts["min_scale"])
    if not opts["input_metric"]:
        return _scaled_svd(W, a.sqrt(), (b / total).sqrt())
    C = stats["input_cov"]
    trace = float(torch.diagonal(C).sum())
    if trace <= 0.0:
        raise ValueError("sparsity_aware option input_metric: input_cov is all zeros (the layer saw no input)")
    L, _ = shifted_cholesky(C / trace, eps=opts["shift_eps"], name="input_cov")
    row = a.sqrt()
    u, s, v, imp = _whitened_svd(row[:, None] * W, L)
    return u / row[:, None], s, v, imp


def element_importance(
    weight: Tensor,
    *,
    fisher: Tensor | None = None,
    importance: Tensor | None = None,
    weight_grad: Tensor | None = None,
) -> Tensor:
    """LPAF element importance ``M [N, K]`` (fp64, >= 0) used by ``"sparsity_aware"``.

    ``importance`` given: it (validated). ``weight_grad`` given: ``|W * dW|`` (first-order, movement
    importance). ``fisher [K]`` given: ``|W_nk| sqrt(fisher_k / N)``. Else ``|W|``.
    """
    W = weight.detach().to(torch.float64)
    N, K = W.shape
    for name, value in (("importance", importance), ("weight_grad", weight_grad)):
        if value is None:
            continue
        if not isinstance(value, Tensor) or tuple(value.shape) != (N, K):
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a [{N}, {K}] tensor (like the weight), got {shape}")
        value = value.detach().to(device=W.device, dtype=torch.float64)
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} has non-finite values (nan or inf)")
        if name == "importance":
            if bool((value < 0).any()):
                raise ValueError(f"importance must be non-negative, got min {float(value.min()):.3e}")
            return value
        return (W * value).abs()
    if fisher is not None:
        return W.abs() * (fisher.to(device=W.device, dtype=torch.float64) / N).sqrt()[None, :]
    return W.abs()


# ---------------------------------------------------------------------------- public entry point
def factorize(
    linear: nn.Linear,
    rank: int | None = None,
    *,
    method: str = "svd",
    stats: Mapping[str, Tensor] | None = None,
    **options,
) -> LowRankLinear:
    """Factor ``linear`` (``W [N, K]``) into a rank-``rank`` :class:`LowRankLinear` by ``method``.

    Args:
        linear: the ``nn.Linear`` to factor (unchanged).
        rank: number of directions ``r`` in ``[1, min(K, N)]``; None keeps ``min(K, N)`` (which
            reproduces ``linear`` to round-off in the weight's dtype, for every method).
        method: one of :data:`FACTORIZATIONS` (see the module docstring for the formulas).
        stats: ONE layer's statistics, ``{stat name: tensor}`` (``calib[name]``); the method needs
            :data:`REQUIRED_STATS` ``[method]`` and uses :data:`OPTIONAL_STATS` ``[method]`` when present.
        **options: the method's options (:data:`METHOD_OPTIONS`), plus ``mask_fn`` / ``temperature`` of the
            returned layer.

    Returns:
        A :class:`LowRankLinear` on the weight's device and dtype with ``U [N, r]``, ``S [r]`` (descending,
        >= 0), ``V [r, K]``, the bias copied, and ``importance`` (fp32 ``[r]``, descending): the reduction
        of the method's objective each direction brings.

    Raises:
        TypeError: ``linear`` is not an ``nn.Linear``, ``rank`` not an int, ``stats`` not a mapping, or an
            option the method does not take.
        ValueError: unknown ``method``; ``rank`` out of range; non-finite weight or bias; a missing
            statistic (named with the method), one of the wrong shape, non-finite or negative; a bad option;
            factors that overflow the weight's dtype even after rescaling (fp16 with an extreme weighting).
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    if not isinstance(method, str) or method not in FACTORIZATIONS:
        raise ValueError(f"method must be one of {FACTORIZATIONS}, got {method!r}")
    weight = linear.weight.detach()
    N, K = weight.shape
    rank = min(K, N) if rank is None else _check_rank(rank, K, N)
    allowed = {**METHOD_OPTIONS[method], **_LAYER_OPTIONS}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} takes no option(s) {unknown}; its options are {sorted(allowed)}")
    opts = {**allowed, **options}
    if not torch.isfinite(weight).all():
        raise ValueError("linear.weight has non-finite values (nan or inf): cannot factor it")
    if linear.bias is not None and not torch.isfinite(linear.bias.detach()).all():
        raise ValueError("linear.bias has non-finite values (nan or inf)")
    for name in ("min_scale",):
        if name in opts:
            opts[name] = _check_float(name, opts[name], low=0.0, low_open=True, high=1.0)
    for name in ("shift_eps", "tol"):
        if name in opts:
            opts[name] = _check_float(name, opts[name], low=0.0, low_open=True)
    for name in ("alpha", "weight_frac", "input_frac", "grad_frac"):
        if name in opts:
            opts[name] = _check_float(name, opts[name], low=0.0)
    if "grad_metric" in opts:
        opts["grad_metric"] = _check_float("grad_metric", opts["grad_metric"], low=0.0, high=1.0)

    if "input_metric" in opts:
        opts["input_metric"] = _check_bool("input_metric", opts["input_metric"])
    st = _get_stats(stats, method, required_stats(method, opts), K, N, weight.device)
    W = weight.to(torch.float64)
    if method == "svd":
        u, s, v, imp = _scaled_svd(W, None, None)
    elif method == "asvd":
        # Clamped before the power (zeros) and after it: raised to alpha > 1, the range 1 / min_scale of the
        # clamped a would grow to min_scale^-alpha, beyond what an fp64 SVD resolves (alpha = 4 gave W back
        # with a relative error of 2e8 at full rank).
        powered = _positive_scale(st["input_abs_mean"], opts["min_scale"]).pow(opts["alpha"])
        if not torch.isfinite(powered).all():
            raise ValueError(f"alpha={opts['alpha']!r}: input_abs_mean ** alpha overflows float64 (max input_abs_mean "
                             f"{float(st['input_abs_mean'].max()):.3e}); use a smaller alpha")
        scale = _positive_scale(powered, opts["min_scale"])
        u, s, v, imp = _scaled_svd(W, None, scale)
    elif method == "fwsvd":
        u, s, v, imp = _scaled_svd(W, None, _positive_scale(st["fisher"], opts["min_scale"]).sqrt())
    elif method == "svd_llm":
        L, _ = shifted_cholesky(st["input_cov"], eps=opts["shift_eps"], name="input_cov")
        u, s, v, imp = _whitened_svd(W, L)
    elif method == "sparsity_aware":
        u, s, v, imp = _sparsity_aware(W, st, opts)
    else:
        u, s, v, imp = _jactus(W, rank, st, opts)

    u, v = _fit_dtype_range(u[:, :rank], v[:rank], weight.dtype)
    layer = LowRankLinear(K, N, rank, bias=linear.bias is not None, mask_fn=opts["mask_fn"],
                          temperature=opts["temperature"], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.U.copy_(u)
        layer.S.copy_(s[:rank])
        layer.V.copy_(v)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
    if not all(bool(torch.isfinite(p).all()) for p in (layer.U, layer.S, layer.V)):
        raise ValueError(f"method {method!r}: the factors of this {K}->{N} layer overflow {weight.dtype} (max |S| = "
                         f"{float(s[:rank].max()):.3e}, max |U| = {float(u.abs().max()):.3e}, max |V| = "
                         f"{float(v.abs().max()):.3e}): factor a float32 copy of the layer, or weight it less "
                         f"unevenly (a larger min_scale / shift_eps)")
    layer.importance = imp[:rank].float()
    return layer
