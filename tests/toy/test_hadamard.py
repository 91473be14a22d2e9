"""Fast Walsh–Hadamard transform: equals the Sylvester matrix, is its own inverse up to L, and the
torch version (two small dense products) agrees with it within its rounding bound.   Run: pytest tests/toy/test_hadamard.py"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seeddelta.codec.hadamard import fwht, fwht_torch, fwht_torch_levels, hadamard_matrix, next_pow2
from seeddelta.testing.tolerances import F64_REORDER, U32


@pytest.mark.parametrize("length", [1, 2, 4, 8, 64, 256])
def test_fwht_is_the_sylvester_matrix(length):
    v = np.random.default_rng(length).standard_normal((3, length))
    h = hadamard_matrix(length)
    i = np.arange(length)
    popcount = np.vectorize(lambda n: bin(n).count("1"))(i[:, None] & i[None, :])
    np.testing.assert_array_equal(h, (-1.0) ** popcount)  # the definition H[i,j] = (-1)^popcount(i&j)
    # float64 butterflies of ±1 sums: <= log2(L)·u64·Σ|v| per entry
    np.testing.assert_allclose(fwht(v), v @ h.T, rtol=0, atol=max(1, np.log2(length)) * 2**-53 * np.abs(v).sum() * 2)
    np.testing.assert_allclose(fwht(fwht(v)), length * v, rtol=0, atol=F64_REORDER * length)


@pytest.mark.parametrize("length", [1, 2, 4, 8, 128, 4096])
def test_torch_kronecker_form_agrees_with_the_butterfly_within_its_rounding_bound(length):
    v = np.random.default_rng(length).standard_normal((5, length)).astype(np.float32)
    exact = v.astype(np.float64) @ hadamard_matrix(length).T
    l1 = np.abs(v.astype(np.float64)).sum(axis=1, keepdims=True)
    # each float32 path is within (its additions)·u32·Σ|v| of the exact transform
    got = fwht_torch(torch.from_numpy(v)).numpy().astype(np.float64)
    assert np.all(np.abs(got - exact) <= fwht_torch_levels(length) * U32 * l1 + 1e-300)
    butterfly = fwht(v).astype(np.float64)
    assert np.all(np.abs(butterfly - exact) <= np.log2(length) * U32 * l1 + 1e-300)
    # exactly representable input (small integers): no rounding anywhere, both paths identical
    ints = np.random.default_rng(length).integers(-8, 9, (5, length)).astype(np.float32)
    np.testing.assert_array_equal(fwht(ints), fwht_torch(torch.from_numpy(ints)).numpy())


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 192, 576, 4096, 4097)] == [1, 1, 2, 4, 4, 8, 256, 1024, 4096, 8192]


def test_non_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(np.zeros(6))
