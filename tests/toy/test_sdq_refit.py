"""Activation-aware values (codec.refit): least squares on calibration activations with the support fixed.

The objective is J(ŵ) = (w − ŵ)ᵀ C (w − ŵ) with C = XᵀX/T. Checked against a brute-force solution
(numpy's lstsq on the explicit problem ‖X·(w − ŵ)‖²) and for the property the brief asks: a refit never
raises the calibration objective over the plain residual (δ = w − w0 on the support)."""

from __future__ import annotations

import numpy as np
import pytest

from seeddelta.codec.refit import objective, refit_diagonal, refit_full

F64_EPS = np.finfo(np.float64).eps


def problem(seed: int, n_out: int = 12, n_in: int = 24, k: int = 4, t: int = 200):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_out, n_in))
    W0 = W * (1 + 0.05 * rng.standard_normal((n_out, n_in))) + 0.05 * rng.standard_normal((n_out, n_in))
    X = rng.standard_normal((t, 6)) @ rng.standard_normal((6, n_in)) + 0.3 * rng.standard_normal((t, n_in))
    idx = np.stack([rng.choice(n_in, k, replace=False) for _ in range(n_out)])
    return W, W0, X, idx


def assemble(W0: np.ndarray, idx: np.ndarray, delta: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    out = W0.copy()
    np.put_along_axis(out, idx, np.take_along_axis(out, idx, axis=1) + delta, axis=1)
    return out if scale is None else out * scale[:, None]


def test_refit_equals_brute_force_least_squares_without_scale():
    W, W0, X, idx = problem(0)
    C = X.T @ X / X.shape[0]
    delta, scale = refit_full(W, W0, idx, C, row_scale=False, ridge=0.0)
    assert scale is None
    for o in range(W.shape[0]):
        # min_δ ‖X·(e − P_S δ)‖ with e = w − w0: lstsq on the support columns
        want, *_ = np.linalg.lstsq(X[:, idx[o]], X @ (W[o] - W0[o]), rcond=None)
        # two solutions of a well-conditioned K×K system (κ ≲ 1e2 here): agree to ~κ·eps
        assert np.allclose(delta[o], want, rtol=1e-9, atol=1e-12), o


def test_refit_with_row_scale_equals_brute_force_for_the_stored_scale():
    W, W0, X, idx = problem(1)
    C = X.T @ X / X.shape[0]
    delta, scale = refit_full(W, W0, idx, C, row_scale=True, ridge=0.0)
    assert scale is not None and np.all(scale == scale.astype(np.float16).astype(np.float64))  # stored as f16
    for o in range(W.shape[0]):
        a = scale[o]
        # joint (a, δ') brute force: lstsq on [X·w0, X_S]; the stored a is its f16 rounding (or 1 if better)
        z, *_ = np.linalg.lstsq(np.column_stack([X @ W0[o], X[:, idx[o]]]), X @ W[o], rcond=None)
        assert a in (np.float64(np.float16(z[0])), 1.0), (o, a, z[0])
        d_prime, *_ = np.linalg.lstsq(X[:, idx[o]], X @ (W[o] - a * W0[o]), rcond=None)
        assert np.allclose(delta[o], d_prime / a, rtol=1e-9, atol=1e-12), o


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("row_scale", [False, True])
def test_refit_never_raises_the_calibration_objective(seed, row_scale):
    W, W0, X, idx = problem(seed, n_out=20, n_in=32, k=3)
    C = X.T @ X / X.shape[0]
    plain = assemble(W0, idx, np.take_along_axis(W - W0, idx, axis=1), None)
    delta, scale = refit_full(W, W0, idx, C, row_scale=row_scale)
    fitted = assemble(W0, idx, delta, scale)
    j_plain, j_fit = objective(W, plain, C), objective(W, fitted, C)
    # exact in real arithmetic (the plain residual is one candidate of the minimisation); the float64
    # solve adds at most a few ulps of the row's objective scale
    slack = 1e3 * F64_EPS * (objective(W, np.zeros_like(W), C) + 1)
    assert np.all(j_fit <= j_plain + slack)
    assert j_fit.sum() < j_plain.sum()  # and on correlated inputs it really lowers it


def test_diagonal_refit_is_the_residual_itself_and_its_scale_helps_off_the_support():
    W, W0, X, idx = problem(2)
    omega = np.mean(X * X, axis=0)
    delta, scale = refit_diagonal(W, W0, idx, omega, row_scale=False)
    assert scale is None and np.array_equal(delta, np.take_along_axis(W - W0, idx, axis=1))
    delta, scale = refit_diagonal(W, W0, idx, omega, row_scale=True)
    assert scale is not None
    fitted = assemble(W0, idx, delta, scale)
    on_support = np.take_along_axis(fitted - W, idx, axis=1)
    assert np.max(np.abs(on_support)) <= 8 * F64_EPS * np.abs(W).max()  # the support is reproduced
    plain = assemble(W0, idx, np.take_along_axis(W - W0, idx, axis=1), None)
    assert np.all(objective(W, fitted, omega=omega) <= objective(W, plain, omega=omega) * (1 + 1e-12))


def test_inputs_never_active_keep_the_plain_residual():
    # a support column the calibration never excites (zero row/column of C): the ridge keeps δ = e there
    W, W0, X, idx = problem(3)
    X[:, idx[0, 0]] = 0.0
    C = X.T @ X / X.shape[0]
    delta, _ = refit_full(W, W0, idx, C, row_scale=False)
    e = W[0, idx[0, 0]] - W0[0, idx[0, 0]]
    assert abs(delta[0, 0] - e) <= 1e-6 * (abs(e) + 1e-12)
