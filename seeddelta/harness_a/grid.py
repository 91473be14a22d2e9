"""Harness A: synthetic matrices with answers known in advance.

Each case builds a W from a pattern, encodes it with the codec, and compares the measured
per-row error with an **independent oracle**: the ideal base is fitted by a different method
than the codec's (masks per XOR diagonal instead of bincount, eigen-decomposition of WᵀW instead
of SVD, explicit cyclic diagonals), the residual is truncated with a full sort instead of a
partition, and everything is in float64 without storage rounding. Storage rounding (f16 values,
f16 base) is allowed for by a per-row bound derived in `_storage_bound`; where spec-harness §2.7
gives a closed form (top-K tail energy, √(1−min(K,b)/b), exactness), the oracle is checked
against it as well. A case passes when every row is within its bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from seeddelta.codec.base import CirculantBase, LowRankBase, XorCirculantBase
from seeddelta.codec.encode import EncodeConfig, SeedDeltaWeight, encode
from seeddelta.codec.hadamard import is_pow2, next_pow2
from seeddelta.codec.metrics import compare_rows
from seeddelta.codec.rounding import U16, U32, fwht_chain_bound
from seeddelta.errors import SeedDeltaError
from seeddelta.harness_a import BASES, PATTERNS

F16_SUBNORMAL_HALF_SPACING = 2.0**-25  # max absolute rounding error below float16's normal range
DELTA_PER_ROW = 3  # non-zeros injected per row by identity_delta (the user's A5)


@dataclass(frozen=True)
class ToyCase:
    pattern: str
    n_in: int
    n_out: int
    K: int
    base: str = "none"
    scheme: str = "coo"
    val_type: str = "f32"
    rank: int = 4  # lowrank pattern rank
    base_rank: int = 4  # lowrank base rank
    block: int = 8  # block pattern size
    scheme_block: int = 8  # block-scheme block size
    seed: int = 1

    @property
    def case_id(self) -> str:
        pat = {"lowrank": f"lowrank{self.rank}", "block": f"block{self.block}"}.get(self.pattern, self.pattern)
        base = f"lowrank{self.base_rank}" if self.base == "lowrank" else self.base
        scheme = f"block{self.scheme_block}" if self.scheme == "block" else "coo"
        name = f"{pat}-{self.n_in}x{self.n_out}-K{self.K}-{base}-{scheme}-{self.val_type}"
        plan = plan_label(self)
        return f"{plan}:{name}" if plan else name

    def validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise SeedDeltaError(f"unknown pattern {self.pattern!r} (expected one of {', '.join(PATTERNS)})")
        if self.base not in BASES:
            raise SeedDeltaError(f"unknown base {self.base!r} (expected one of {', '.join(BASES)})")
        for name in ("n_in", "n_out", "K", "block", "scheme_block", "rank", "base_rank"):
            if getattr(self, name) <= 0:
                raise SeedDeltaError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.pattern == "lowrank" and self.rank > min(self.n_in, self.n_out):
            raise SeedDeltaError(f"--rank {self.rank} exceeds min(n_in, n_out) = {min(self.n_in, self.n_out)}")
        if self.base == "lowrank" and self.base_rank > min(self.n_in, self.n_out):
            raise SeedDeltaError(f"base rank {self.base_rank} exceeds min(n_in, n_out) = {min(self.n_in, self.n_out)}")


def plan_label(case: ToyCase) -> str:
    """The user's A1–A5 (seeds/000…) where a case is one of them."""
    if case.pattern == "identity" and case.base == "xor_circulant":
        return "A1"
    if case.pattern == "diag" and case.base == "xor_circulant":
        return "A2"
    if case.pattern == "lowrank" and case.base == "lowrank":
        return "A3"
    if case.pattern == "circulant" and case.base == "circulant":
        return "A4"
    if case.pattern == "identity_delta":
        return "A5"
    return ""


# --- patterns ------------------------------------------------------------------------------
def make_pattern(case: ToyCase) -> np.ndarray:
    """W (n_out, n_in) float32 for the case's pattern; random parts drawn from the case seed."""
    rng = np.random.default_rng(case.seed)
    n_in, n_out = case.n_in, case.n_out
    o = np.arange(n_out)[:, None]
    i = np.arange(n_in)[None, :]
    if case.pattern == "identity":
        W = (o == i).astype(np.float64)
    elif case.pattern == "diag":
        W = np.where(o == i, 1.0 + 0.001 * o, 0.0)
    elif case.pattern == "lowrank":
        W = (0.1 * rng.standard_normal((n_out, case.rank))) @ (0.1 * rng.standard_normal((case.rank, n_in)))
    elif case.pattern == "circulant":
        c = 0.1 * rng.standard_normal(n_in)
        W = c[(i - o) % n_in]
    elif case.pattern == "block":
        W = ((o // case.block) == (i // case.block)).astype(np.float64)
    elif case.pattern == "identity_delta":
        W = (o == i).astype(np.float64)
        cols = np.argsort(rng.random((n_out, n_in)), axis=1)[:, :DELTA_PER_ROW]
        np.put_along_axis(W, cols, np.take_along_axis(W, cols, 1) + 0.5 * rng.standard_normal(cols.shape), 1)
    else:  # xor: W[bL + p, i] = h_b[p XOR i] (tall) — an XOR-circulant matrix with the identity permutation
        L = next_pow2(min(n_in, n_out))
        h = rng.standard_normal((-(-max(n_in, n_out) // L), L))
        if n_out >= n_in:
            W = h[o // L, (o % L) ^ i]
        else:
            W = h[i // L, o ^ (i % L)]
    return W.astype(np.float32)


# --- oracle ----------------------------------------------------------------------------------
def _oracle_xor_base(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each XOR diagonal with the identity permutation, all rows; one boolean mask per
    diagonal (a different computation from the codec's bincount). Returns (W0, h2 per block)."""
    n_out, n_in = W.shape
    L = next_pow2(min(n_in, n_out))
    B = -(-max(n_in, n_out) // L)
    o = np.arange(n_out)[:, None]
    i = np.arange(n_in)[None, :]
    block = (o // L) if n_out >= n_in else (i // L)
    diag = ((o % L) ^ i) if n_out >= n_in else (o ^ (i % L))
    W0 = np.zeros_like(W, dtype=np.float64)
    h2 = np.zeros((B, L))
    for b in range(B):
        for u in range(L):
            mask = (block == b) & (diag == u)
            if mask.any():
                h2[b, u] = W[mask].astype(np.float64).mean()
                W0[mask] = h2[b, u]
    return W0, h2


def _oracle_lowrank_base(W: np.ndarray, rank: int) -> np.ndarray:
    """Eckart–Young via the eigenvectors of WᵀW: W0 = W·V_r·V_rᵀ."""
    W64 = W.astype(np.float64)
    evals, evecs = np.linalg.eigh(W64.T @ W64)
    v = evecs[:, np.argsort(evals)[::-1][:rank]]
    return W64 @ v @ v.T


def _oracle_circulant_base(W: np.ndarray) -> np.ndarray:
    n_out, n_in = W.shape
    rows = np.arange(n_out)
    c = np.array([W[rows, (rows + j) % n_in].astype(np.float64).mean() for j in range(n_in)])
    return c[(np.arange(n_in)[None, :] - rows[:, None]) % n_in]


def _oracle_truncate(R: np.ndarray, case: ToyCase) -> np.ndarray:
    """Keep the K largest |R| per row (coo) or the top blocks by energy (block), by full sort."""
    n_out, n_in = R.shape
    kept = np.zeros_like(R)
    if case.scheme == "coo":
        k = min(case.K, n_in)
        order = np.argsort(-np.abs(R), axis=1, kind="stable")[:, :k]
        np.put_along_axis(kept, order, np.take_along_axis(R, order, 1), 1)
        return kept
    b = case.scheme_block
    nb_total = -(-n_in // b)
    nb = min(-(-min(case.K, n_in) // b), nb_total)
    padded = np.zeros((n_out, nb_total * b))
    padded[:, :n_in] = R
    energy = (padded.reshape(n_out, nb_total, b) ** 2).sum(axis=2)
    top = np.argsort(-energy, axis=1, kind="stable")[:, :nb]
    mask = np.zeros((n_out, nb_total), dtype=bool)
    np.put_along_axis(mask, top, True, 1)
    return np.where(np.repeat(mask, b, axis=1)[:, :n_in], R, 0.0)


@dataclass
class OracleResult:
    w_hat: np.ndarray  # ideal float64 reconstruction
    kept: np.ndarray  # ideal residual values kept
    base_row_norm: np.ndarray  # per row, a norm that bounds the base's storage error (see _storage_bound)
    closed_form: np.ndarray | None  # per-row rel_l2 from spec-harness §2.7, where one exists


def oracle(W: np.ndarray, case: ToyCase) -> OracleResult:
    n_out, n_in = W.shape
    base_norm = np.zeros(n_out)
    if case.base == "xor_circulant":
        W0, h2 = _oracle_xor_base(W)
        L = h2.shape[1]
        blocks = (np.arange(n_out) // L) if n_out >= n_in else None
        base_norm = np.linalg.norm(h2, axis=1)[blocks] if blocks is not None else np.full(n_out, np.linalg.norm(h2))
    elif case.base == "lowrank":
        W0 = _oracle_lowrank_base(W, case.base_rank)
        base_norm = np.linalg.norm(W0, axis=1) * 2  # U and V each rounded: ≤ 2u relative (first order)
    elif case.base == "circulant":
        W0 = _oracle_circulant_base(W)
        base_norm = np.linalg.norm(W0, axis=1)
    else:
        W0 = np.zeros((n_out, n_in))
    kept = _oracle_truncate(W.astype(np.float64) - W0, case)
    return OracleResult(W0 + kept, kept, base_norm, _closed_form(W, case))


def _closed_form(W: np.ndarray, case: ToyCase) -> np.ndarray | None:
    """Per-row rel_l2 predicted by theory alone (spec-harness §2.7), or None."""
    n_out, n_in = W.shape
    exact_bases = {
        "identity": {"xor_circulant"}, "diag": {"xor_circulant"}, "xor": {"xor_circulant"},
        "lowrank": {"lowrank"} if case.base_rank >= case.rank else set(), "circulant": {"circulant"},
        "block": {"xor_circulant"} if is_pow2(case.block) else set(),
    }
    if case.base in exact_bases.get(case.pattern, set()):
        return np.zeros(n_out)
    if case.base == "none" and case.scheme == "coo":
        if case.pattern in ("identity", "diag"):
            return np.zeros(n_out)  # one non-zero per row
        if case.pattern == "identity_delta" and case.K >= DELTA_PER_ROW + 1:
            return np.zeros(n_out)
        if case.pattern == "block":
            o = np.arange(n_out)
            width = np.clip(n_in - (o // case.block) * case.block, 0, case.block)  # ones in row o
            frac = np.minimum(case.K, width) / np.maximum(width, 1)
            return np.where(width > 0, np.sqrt(1.0 - frac), 0.0)
    return None


def _closed_form_tolerance(W: np.ndarray, case: ToyCase) -> float:
    """The closed forms hold for the pattern in exact arithmetic; W is stored float32.

    Every pattern except lowrank keeps its structure exactly under float32 rounding (equal values
    round equally), so only float64 noise remains (1e-9, far above n·1e-16). A rank-r product
    becomes full rank: with E the rounding (‖E‖_F ≤ u32·‖W‖_F), the row error of the best rank-r
    fit is ≤ u32·‖w‖ + ‖w‖·‖E‖/(σ_r − ‖E‖) (Davis–Kahan), i.e. relative u32·(1 + ‖W‖_F/(σ_r − ‖E‖))."""
    if case.pattern != "lowrank":
        return 1e-9
    sigma = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    e = U32 * np.linalg.norm(W.astype(np.float64))
    return 1e-9 + U32 + e / max(sigma[min(case.rank, len(sigma)) - 1] - e, 1e-300)


def _storage_bound(case: ToyCase, orc: OracleResult, w_norm: np.ndarray, L: int) -> np.ndarray:
    """Per-row absolute bound on ‖ŵ_stored − ŵ_ideal‖ from storage rounding (and f32 arithmetic).

    * base: stored base rows differ from ideal by ≤ u_b·‖h2‖ (+ L·2⁻²⁵ for f16 subnormals) for the
      XOR base (d2 = H·h2/L rounded elementwise, ‖H·δd2‖ = √L‖δd2‖), ≤ u_b·‖row‖ otherwise;
    * selection: best-K-term error is 1-Lipschitz in the residual, so a base error e moves it ≤ e;
    * values: each kept value rounds with relative error ≤ u_v (+ 2⁻²⁵ absolute for f16 subnormals).
    """
    u_val = U16 if case.val_type == "f16" else U32
    u_base = u_val  # the toy stores base arrays in the value type (encode_config: base_store = val_type)
    f32_transform = (2 * math.log2(max(L, 2)) + 4) * U32  # float32 FWHT of h2 before rounding d2
    base_err = np.zeros_like(w_norm)
    if case.base != "none":
        base_err = (u_base + f32_transform) * orc.base_row_norm
        if case.base == "xor_circulant" and case.val_type == "f16":
            base_err = base_err + L * F16_SUBNORMAL_HALF_SPACING
    kept_norm = np.linalg.norm(orc.kept, axis=1) + base_err
    n_kept = np.count_nonzero(orc.kept, axis=1)
    subnormal = np.sqrt(np.maximum(n_kept, 1)) * F16_SUBNORMAL_HALF_SPACING if case.val_type == "f16" else 0.0
    val_err = u_val * kept_norm + subnormal
    return 2 * base_err + val_err + 1e-12 * np.maximum(w_norm, 1.0)


# --- running a case ------------------------------------------------------------------------------
@dataclass
class CaseResult:
    id: str
    pattern: str
    n_in: int
    n_out: int
    K: int
    base: str
    scheme: str
    value_type: str
    measured: dict[str, float]
    expected: dict[str, float]
    closed_form_rel_l2_mean: float | None
    deviation: float  # worst row: |measured − expected| − tolerance (≤ 0 passes), over rel_l2 and cos
    tolerance_max: float
    functional_deviation: float  # worst |apply(x) − dense·x| − bound (≤ 0 passes)
    passed: bool
    notes: list[str] = field(default_factory=list)


def _summary(rel: np.ndarray, cos: np.ndarray, ratio: np.ndarray) -> dict[str, float]:
    return {
        "rel_l2_mean": float(np.mean(rel)), "rel_l2_p95": float(np.percentile(rel, 95)),
        "cos_mean": float(np.mean(cos)), "cos_p05": float(np.percentile(cos, 5)),
        "norm_ratio_mean": float(np.mean(ratio)),
    }


def _functional_deviation(sdw: SeedDeltaWeight, W_hat: np.ndarray, n_x: int, seed: int) -> float:
    """Fast path (float32 chain, sparse residual) against the closed form (dense float64).

    Bound per output: (2·levels(L) + 2)·u32·‖d2‖₁·‖x‖₁ for the Hadamard chain (each FWHT addition adds
    ≤ u·Σ|·|), (K + 2)·u32·Σ|v·x| for the residual sum, u32·|y| for the row scale, and
    (n_in + r)·u32·|U||V||x| for a low-rank base."""
    rng = np.random.default_rng([seed, 7])
    x = rng.standard_normal((n_x, sdw.n_in)).astype(np.float32)
    exact = x.astype(np.float64) @ W_hat.T
    fast = sdw.apply(x).astype(np.float64)
    x_abs = np.abs(x.astype(np.float64))
    bound = (sdw.K + 4) * U32 * (x_abs @ np.abs(W_hat).T)
    base = sdw.base
    if isinstance(base, XorCirculantBase) and base.d2 is not None:
        L = base.d2.shape[1]
        d2_l1 = np.abs(base.d2.astype(np.float64)).sum(axis=1).max()
        bound += fwht_chain_bound(L, U32) * d2_l1 * x_abs.sum(axis=1, keepdims=True)
    elif isinstance(base, LowRankBase):
        lowrank = np.abs(base.u.astype(np.float64)) @ np.abs(base.v.astype(np.float64))
        bound += (sdw.n_in + base.u.shape[1] + 2) * U32 * (x_abs @ lowrank.T)
    elif isinstance(base, CirculantBase):
        bound += 1e-10 * np.abs(base.c.astype(np.float64)).sum() * x_abs.sum(axis=1, keepdims=True)
    bound += 1e-30
    return float(np.max(np.abs(fast - exact) - bound))


# Peak working memory of one case, measured (max RSS minus the interpreter's): 2048 x 2048 cases take
# 180-290 MB over a 300 MB baseline (~45-70 bytes per weight: W, its oracle, Ŵ, float64 copies), plus
# square L x L or n_in x n_in work arrays of the bases and oracles. The estimate takes 80 bytes per
# weight and 32 per square element: above the measurements, so a refused case would really not fit.
BYTES_PER_WEIGHT = 80
BYTES_PER_SQUARE = 32


def case_bytes(case: ToyCase) -> int:
    """A conservative estimate of the memory `run_case` needs for `case` (see the constants above)."""
    L = next_pow2(min(case.n_in, case.n_out))  # the XOR base's block; n_in x n_in: the oracles' WᵀW
    return BYTES_PER_WEIGHT * case.n_in * case.n_out + BYTES_PER_SQUARE * (L * L + case.n_in * case.n_in)


def encode_config(case: ToyCase) -> EncodeConfig:
    return EncodeConfig(
        K=case.K, scheme=case.scheme, block=case.scheme_block, val_type=case.val_type, base=case.base,
        base_max_samples=0, base_perm_trials=1, base_rank=case.base_rank, base_store=case.val_type, seed=case.seed,
    )


def run_case(case: ToyCase, eval_x: int = 8) -> CaseResult:
    case.validate()
    W = make_pattern(case)
    sdw = encode(W, encode_config(case))
    W_hat = sdw.dense()
    measured = compare_rows(W, W_hat)
    orc = oracle(W, case)
    expected = compare_rows(W, orc.w_hat)
    w_norm = np.linalg.norm(W.astype(np.float64), axis=1)
    L = next_pow2(min(case.n_in, case.n_out))
    abs_tol = _storage_bound(case, orc, w_norm, L)
    rel_tol = abs_tol / np.maximum(w_norm, 1e-300)
    hat_norm = np.linalg.norm(orc.w_hat, axis=1)
    # |Δcos| ≤ (π/2)·‖δ‖/‖ŵ‖ (the angle moved by a perturbation δ of ŵ); capped at the range of cos.
    cos_tol = np.minimum(np.pi / 2 * abs_tol / np.maximum(hat_norm, 1e-300), 2.0)
    dev_rel = np.abs(measured.rel_l2 - expected.rel_l2) - rel_tol
    dev_cos = np.abs(measured.cos - expected.cos) - cos_tol
    notes = []
    deviation = float(max(dev_rel.max(), dev_cos.max()))
    closed_mean = None
    if orc.closed_form is not None:
        closed_mean = float(orc.closed_form.mean())
        closed_tol = _closed_form_tolerance(W, case)
        gap = float(np.max(np.abs(expected.rel_l2 - orc.closed_form) - closed_tol))
        if gap > 0:
            notes.append(f"oracle disagrees with closed form by {gap:.3g}")
            deviation = max(deviation, gap)
        deviation = max(deviation, float(np.max(np.abs(measured.rel_l2 - orc.closed_form) - rel_tol - closed_tol)))
    func_dev = _functional_deviation(sdw, W_hat, eval_x, case.seed)
    passed = deviation <= 0 and func_dev <= 0 and not notes
    return CaseResult(
        id=case.case_id, pattern=case.pattern, n_in=case.n_in, n_out=case.n_out, K=case.K, base=case.base,
        scheme=case.scheme, value_type=case.val_type,
        measured=_summary(measured.rel_l2, measured.cos, measured.norm_ratio),
        expected=_summary(expected.rel_l2, expected.cos, expected.norm_ratio),
        closed_form_rel_l2_mean=closed_mean, deviation=deviation, tolerance_max=float(rel_tol.max()),
        functional_deviation=func_dev, passed=passed, notes=notes,
    )


# --- the grid --------------------------------------------------------------------------------
SHAPES = ((64, 64), (64, 192), (192, 64), (48, 80), (80, 48), (100, 60))  # (n_in, n_out)


def default_grid(seed: int = 1) -> list[ToyCase]:
    """≥ 200 cases: every pattern and shape with and without the XOR base, the user's A3/A4 with
    their own bases, the block scheme, and f16 storage."""
    cases: list[ToyCase] = []
    for n_in, n_out in SHAPES:
        for pattern in PATTERNS:
            for base in ("none", "xor_circulant"):
                for k in (1, 8):
                    cases.append(ToyCase(pattern, n_in, n_out, k, base, seed=seed))
        for k in (1, 8):
            for base_rank in (4, 2):  # 4: exact (A3); 2: Eckart–Young tail + top-K
                cases.append(ToyCase("lowrank", n_in, n_out, k, "lowrank", base_rank=base_rank, seed=seed))
            cases.append(ToyCase("circulant", n_in, n_out, k, "circulant", seed=seed))
            cases.append(ToyCase("block", n_in, n_out, k, "none", block=6, seed=seed))  # non-power-of-two block
    for n_in, n_out in ((64, 64), (48, 80), (192, 64)):
        for pattern in ("block", "lowrank", "circulant", "identity_delta"):
            for base in ("none", "xor_circulant"):
                for k in (8, 16):
                    cases.append(ToyCase(pattern, n_in, n_out, k, base, scheme="block", seed=seed))
    for n_in, n_out in ((64, 64), (64, 192), (80, 48)):
        for pattern in PATTERNS:
            for base in ("none", "xor_circulant"):
                cases.append(ToyCase(pattern, n_in, n_out, 4, base, val_type="f16", seed=seed))
        cases.append(ToyCase("lowrank", n_in, n_out, 4, "lowrank", val_type="f16", seed=seed))
        cases.append(ToyCase("circulant", n_in, n_out, 4, "circulant", val_type="f16", seed=seed))
    return cases


def report_dict(results: list[CaseResult]) -> dict:
    return {
        "harness": "A",
        "cases": [asdict(r) for r in results],
        "n_cases": len(results),
        "n_passed": sum(r.passed for r in results),
        "all_passed": all(r.passed for r in results),
    }
