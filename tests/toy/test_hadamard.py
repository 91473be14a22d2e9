"""Fast Walsh–Hadamard transform: equals the Sylvester matrix, is its own inverse up to L, and the
numpy and torch versions agree bit for bit.   Run: pytest tests/toy/test_hadamard.py"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seeddelta.hadamard import fwht, fwht_torch, hadamard_matrix, next_pow2


@pytest.mark.parametrize("length", [1, 2, 4, 8, 64, 256])
def test_fwht_is_the_sylvester_matrix(length):
    v = np.random.default_rng(length).standard_normal((3, length))
    h = hadamard_matrix(length)
    i = np.arange(length)
    popcount = np.vectorize(lambda n: bin(n).count("1"))(i[:, None] & i[None, :])
    np.testing.assert_array_equal(h, (-1.0) ** popcount)  # the definition H[i,j] = (-1)^popcount(i&j)
    # float64 butterflies of ±1 sums: <= log2(L)·u64·Σ|v| per entry
    np.testing.assert_allclose(fwht(v), v @ h.T, rtol=0, atol=max(1, np.log2(length)) * 2**-53 * np.abs(v).sum() * 2)
    np.testing.assert_allclose(fwht(fwht(v)), length * v, rtol=0, atol=1e-12 * length)


def test_torch_and_numpy_agree_exactly_in_float32():
    v = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    np.testing.assert_array_equal(fwht(v), fwht_torch(torch.from_numpy(v)).numpy())


def test_next_pow2():
    assert [next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 192, 576, 4096, 4097)] == [1, 1, 2, 4, 4, 8, 256, 1024, 4096, 8192]


def test_non_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(np.zeros(6))
