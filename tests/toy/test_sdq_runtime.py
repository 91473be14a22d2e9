"""Variant sdq, runtime side: the sparse mode's torch unpacking of Q4_0/Q8_0/MXFP4 bytes is gguf-py's
dequantization bit for bit (gguf-py decodes ggml's types as llama.cpp does), on arbitrary bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from seeddelta.runtime.sdq_projections import TORCH_TYPES, torch_dequantize


@pytest.mark.parametrize("qtype", TORCH_TYPES, ids=lambda t: t.name)
def test_torch_unpacking_is_gguf_pys_dequantization_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    _bs, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(17, 6 * nbytes), dtype=np.uint8)  # every byte pattern: scales too
    if qtype == GGMLQuantizationType.MXFP4:
        raw[0, 0], raw[0, nbytes], raw[1, 0] = 0, 1, 255  # E8M0 bytes 0 and 1 (ggml's denormal branch), 255
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf scales times codes: numpy warns, torch does not
        want = np.asarray(dequantize(raw, qtype), dtype=np.float32)
    got = torch_dequantize(torch.from_numpy(raw), qtype).numpy()
    assert got.shape == want.shape
    # identical bits, NaN/Inf included (random f16 scales can be NaN or ±Inf)
    assert np.array_equal(got, want, equal_nan=True)
