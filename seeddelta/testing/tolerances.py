"""Named tolerances for the test suite, each with where it comes from."""

from __future__ import annotations

# Unit roundoffs and the Hadamard chain's bound live with the codec (harness A uses them too).
from seeddelta.codec.rounding import U16 as U16
from seeddelta.codec.rounding import U32 as U32
from seeddelta.codec.rounding import U64 as U64
from seeddelta.codec.rounding import fwht_chain_bound as fwht_chain_bound

# Largest absolute rounding error of float16 below its normal range (subnormal spacing 2^-24, halved).
F16_SUBNORMAL_ABS = 2.0**-25
# Two float64 evaluations of one exact quantity that differ only in summation order (or one extra
# rounding): each errs by at most n·u64·Σ|terms|, u64 = 1.1e-16; for the n <= 4096-term sums of the
# test suite that is <= 4.6e-13 of the largest magnitude, so the two agree within 1e-12 of it.
F64_REORDER = 1e-12
# Float64 metric arithmetic on rows of <= 10^4 entries: n·u64 ≈ 1e-12, so 1e-10 is a loose bound.
F64_METRIC_ATOL = 1e-10
