"""Named tolerances for the test suite, each with where it comes from."""

from __future__ import annotations

from seeddelta.codec.hadamard import fwht_torch_levels

# Unit roundoffs (half an ulp of 1.0): IEEE round-to-nearest error bound for one conversion.
U16 = 2.0**-11
U32 = 2.0**-24
U64 = 2.0**-53
# Largest absolute rounding error of float16 below its normal range (subnormal spacing 2^-24, halved).
F16_SUBNORMAL_ABS = 2.0**-25
# Two float64 evaluations of one exact quantity that differ only in summation order (or one extra
# rounding): each errs by at most n·u64·Σ|terms|, u64 = 1.1e-16; for the n <= 4096-term sums of the
# test suite that is <= 4.6e-13 of the largest magnitude, so the two agree within 1e-12 of it.
F64_REORDER = 1e-12
# Float64 metric arithmetic on rows of <= 10^4 entries: n·u64 ≈ 1e-12, so 1e-10 is a loose bound.
F64_METRIC_ATOL = 1e-10


def fwht_chain_bound(length: int, u: float) -> float:
    """Relative bound of the Hadamard chain H·D·H·P evaluated by `fwht_torch` in a float type with
    unit roundoff u: each of its additions (fwht_torch_levels(L) per transform) adds at most u·Σ|·|,
    plus one rounding per diagonal product."""
    return (2 * fwht_torch_levels(length) + 2) * u
