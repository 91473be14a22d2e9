"""Floating-point rounding facts the codec's error bounds are built from (harness A's oracles and the
test suite state their tolerances with them)."""

from __future__ import annotations

from seeddelta.codec.hadamard import fwht_torch_levels

# Unit roundoffs (half an ulp of 1.0): IEEE round-to-nearest error bound for one conversion.
U16 = 2.0**-11
U32 = 2.0**-24
U64 = 2.0**-53


def fwht_chain_bound(length: int, u: float) -> float:
    """Relative bound of the Hadamard chain H·D·H·P evaluated by `fwht_torch` in a float type with
    unit roundoff u: each of its additions (fwht_torch_levels(L) per transform) adds at most u·Σ|·|,
    plus one rounding per diagonal product."""
    return (2 * fwht_torch_levels(length) + 2) * u
