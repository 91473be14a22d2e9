"""Activation-aware values of a sparse residual over a fixed base: least squares on calibration data.

With the base W0 and each row's support S fixed, the row's residual values δ (and its row scale a,
when asked) minimise the calibration objective

    J(ŵ) = (w − ŵ)ᵀ · C · (w − ŵ),      ŵ = a·(w0 + P_S·δ),   C = E[x xᵀ] over the calibration tokens,

i.e. the mean squared error of the row's output ‖(w − ŵ)·Xᵀ‖²/T. Two forms of C:

* **diagonal** — C = diag(ω) with ω = E[x_j²] (llama-imatrix's statistic): then δ on S is the
  residual itself and only the row scale moves (it is fitted where the residual does not reach);
* **full** — C = XᵀX/T collected per FFN input (`evaluation.activations.collect_xtx`): the support
  columns are solved jointly, so correlated inputs share the correction.

The row scale is solved jointly with δ as a linear problem in (a, δ' = a·δ), then rounded to f16
(as stored) and δ re-solved for that stored scale, so the stored pair is consistent. A ridge
λ·‖δ' − a·e_S‖² with λ = RIDGE·mean(diag C) keeps the system regular where inputs are never active
(there δ stays the weight-space residual); it is the only way the result can differ from the exact
minimiser, and it vanishes as RIDGE → 0.
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-9  # relative to mean(diag C): far below any real curvature, enough for a zero column
_ROWS = 512  # rows solved at once (bounds the (rows, K+1, K+1) systems)


def objective(W: np.ndarray, W_hat: np.ndarray, C: np.ndarray | None = None, omega: np.ndarray | None = None) -> np.ndarray:
    """Per-row calibration objective (w − ŵ)ᵀC(w − ŵ) (C full), Σ ω_j (w − ŵ)_j² (diagonal), or the plain
    squared error (neither). float64, shape (n_out,)."""
    E = np.asarray(W, dtype=np.float64) - np.asarray(W_hat, dtype=np.float64)
    if C is not None:
        return np.einsum("oi,ij,oj->o", E, np.asarray(C, dtype=np.float64), E)
    if omega is not None:
        return (E * E) @ np.asarray(omega, dtype=np.float64)
    return np.sum(E * E, axis=1)


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float16).astype(np.float64)


def _safe_scale(a: np.ndarray) -> np.ndarray:
    """The stored row scale: f16 of the solution, 1 where the solution is unusable (≤ 0, not finite,
    or rounds to 0/∞ in f16) — a row scale of ~0 would make δ = δ'/a explode."""
    a16 = _f16(np.where(np.isfinite(a), a, 1.0))
    ok = np.isfinite(a16) & (a16 > 0)
    return np.where(ok, a16, 1.0)


def refit_diagonal(W: np.ndarray, W0: np.ndarray, idx: np.ndarray, omega: np.ndarray | None,
                   row_scale: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(δ (n_out, K) float64, stored row scale (n_out,) f16-valued float64 or None) for C = diag(ω).

    Without a row scale δ = e_S (e = w − w0): the exact minimiser. With one, a minimises the
    weighted error off the support, Σ_{j∉S} ω_j (w_j − a·w0_j)², and δ = w_S/a − w0_S makes the
    support exact for the stored a; a row keeps a = 1 where the rounded scale would not lower it."""
    W = np.asarray(W, dtype=np.float64)
    W0 = np.asarray(W0, dtype=np.float64)
    rows = np.arange(W.shape[0])[:, None]
    if not row_scale:
        return W[rows, idx] - W0[rows, idx], None
    om = np.ones(W.shape[1]) if omega is None else np.asarray(omega, dtype=np.float64)
    off = np.broadcast_to(om, W.shape).copy()
    off[rows, idx] = 0.0
    num = np.sum(off * W * W0, axis=1)
    den = np.sum(off * W0 * W0, axis=1)
    a = _safe_scale(np.where(den > 1e-300, num / np.where(den > 1e-300, den, 1.0), 1.0))
    j_a = np.sum(off * (W - a[:, None] * W0) ** 2, axis=1)
    j_1 = np.sum(off * (W - W0) ** 2, axis=1)
    a = np.where(j_a <= j_1, a, 1.0)
    delta = W[rows, idx] / a[:, None] - W0[rows, idx]
    return delta, a


def _delta_for_scale(w: np.ndarray, w0: np.ndarray, S: np.ndarray, C: np.ndarray, Css: np.ndarray, a: np.ndarray,
                     lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(δ = δ'/a, objective per row) with δ' minimising (w − a·w0 − P δ')ᵀC(…) + λ‖δ' − a·e_S‖² for fixed a."""
    rows = np.arange(w.shape[0])[:, None]
    t = w - a[:, None] * w0
    rhs = (t @ C)[rows, S] + lam * a[:, None] * (w[rows, S] - w0[rows, S])
    d_prime = np.linalg.solve(Css, rhs[..., None])[..., 0]
    resid = t.copy()
    resid[rows, S] -= d_prime
    return d_prime / a[:, None], np.einsum("oi,ij,oj->o", resid, C, resid)


def refit_full(W: np.ndarray, W0: np.ndarray, idx: np.ndarray, C: np.ndarray,
               row_scale: bool, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray | None]:
    """(δ, stored row scale or None) minimising (w − ŵ)ᵀC(w − ŵ) per row for the support `idx`.

    With a row scale, (a, δ') is solved jointly, a rounded to f16, δ' re-solved for it; a row keeps
    a = 1 where that is at least as good, so the result is never worse than the refit without scale."""
    W = np.asarray(W, dtype=np.float64)
    W0 = np.asarray(W0, dtype=np.float64)
    C = np.asarray(C, dtype=np.float64)
    n_out, k = idx.shape
    lam = ridge * max(float(np.mean(np.diag(C))), 1e-300)
    delta = np.zeros((n_out, k))
    scale = np.ones(n_out) if row_scale else None
    eye = np.eye(k)
    for r0 in range(0, n_out, _ROWS):
        r = slice(r0, min(n_out, r0 + _ROWS))
        w, w0, S = W[r], W0[r], idx[r]
        rows = np.arange(w.shape[0])[:, None]
        Css = C[S[:, :, None], S[:, None, :]] + lam * eye  # (R, K, K)
        ones = np.ones(w.shape[0])
        d1, j1 = _delta_for_scale(w, w0, S, C, Css, ones, lam)
        if not row_scale:
            delta[r] = d1
            continue
        # unknowns (a, δ'): ŵ = a·w0 + P_S δ'; ridge λ‖δ' − a·e_S‖² with e_S = (w − w0)_S
        Cw, Cw0 = w @ C, w0 @ C  # C symmetric: (C w)ᵀ = wᵀ C
        e_s = w[rows, S] - w0[rows, S]
        g = np.empty((w.shape[0], k + 1, k + 1))
        g[:, 0, 0] = np.einsum("oi,oi->o", w0, Cw0) + lam * np.sum(e_s * e_s, axis=1)
        g[:, 0, 1:] = Cw0[rows, S] - lam * e_s
        g[:, 1:, 0] = g[:, 0, 1:]
        g[:, 1:, 1:] = Css
        rhs = np.concatenate([np.einsum("oi,oi->o", w0, Cw)[:, None], Cw[rows, S]], axis=1)
        a = _safe_scale(np.linalg.solve(g, rhs[..., None])[..., 0, 0])
        da, ja = _delta_for_scale(w, w0, S, C, Css, a, lam)
        better = ja <= j1
        assert scale is not None
        scale[r] = np.where(better, a, 1.0)
        delta[r] = np.where(better[:, None], da, d1)
    return delta, scale
