"""A larger builder run with every option at once (block scheme, base, row scale, imatrix, metrics,
strip, two threads) on a Q8_0 model: every stored weight is checked against the independent
reconstruction and the report's metrics against it (slower than the toy tier)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

from seeddelta.cli import main
from seeddelta.gguf_format.seeddelta_tensors import read_seeddelta_file
from seeddelta.testing.oracles import reference_dense
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf
from seeddelta.testing.tolerances import F64_REORDER

N_EMBD, N_FF, N_LAYER = 128, 352, 3  # 352 = 11·32: not a power of two; wide down has B = 3


def test_block_base_row_scale_imatrix_strip_on_q8_0(tmp_path, capsys):
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=N_LAYER, n_embd=N_EMBD, n_ff=N_FF, n_head=8, n_head_kv=2,
                        dtype="Q8_0", seed=31)
    make_imatrix(tmp_path / "im.gguf", m, seed=32)
    rc = main(["build", "-i", m.path, "-o", str(tmp_path / "o.gguf"), "--scheme", "block", "--block", "16",
               "--K-gate", "40", "--K-up", "24", "--K-down", "64", "--base", "--base-perm-trials", "2",
               "--row-scale", "--imatrix", str(tmp_path / "im.gguf"), "--eval-cols", "100000", "--eval-x", "8",
               "--strip-dense", "--report-json", str(tmp_path / "r.json"), "-t", "2"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()  # (the progress bar shows only on a terminal)
    report = json.loads((tmp_path / "r.json").read_text())
    out = GGUFReader(tmp_path / "o.gguf")
    assert out.fields["seeddelta.resid.K_variable"].contents() is True
    assert [out.fields[f"seeddelta.resid.K_{k}"].contents() for k in ("gate", "up", "down")] == [40, 24, 64]
    src = {t.name: t for t in GGUFReader(m.path).tensors}
    sd = read_seeddelta_file(tmp_path / "o.gguf")
    for e in report["weights"]:
        key = (e["layer"], e["kind"])
        n_in, n_out = e["n_in"], e["n_out"]
        t = src[f"blk.{e['layer']}.{e['kind']}.weight"]
        W = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(n_out, n_in)
        arrays = sd.entries[key].arrays()
        ref = reference_dense(arrays, n_in, n_out)
        np.testing.assert_allclose(reference_dense(arrays, n_in, n_out, closed_form=True), ref, rtol=0,
                                   atol=F64_REORDER * np.abs(ref).max())  # float64 re-summation only
        np.testing.assert_allclose(sd.weights[key].dense(), ref, rtol=0, atol=F64_REORDER * np.abs(ref).max())
        rel = np.linalg.norm(W - ref, axis=1) / np.linalg.norm(W, axis=1)
        cos = np.sum(W * ref, axis=1) / (np.linalg.norm(W, axis=1) * np.linalg.norm(ref, axis=1))
        assert e["rel_l2_mean"] == pytest.approx(rel.mean(), abs=1e-9)
        assert e["cos_p05"] == pytest.approx(np.percentile(cos, 5), abs=1e-9)
        nb = -(-{"ffn_gate": 40, "ffn_up": 24, "ffn_down": 64}[e["kind"]] // 16)
        assert (e["n_blocks"], e["K"], e["block"]) == (nb, nb * 16, 16)
        assert e["strip_dense"] and f"blk.{e['layer']}.{e['kind']}.weight" not in {u.name for u in out.tensors}
        assert e["dense_type"] == "Q8_0" and e["bytes_dense"] == int(t.n_bytes)
