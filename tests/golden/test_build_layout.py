"""Golden snapshots of what `seeddelta build` writes: the SeedΔ file's layout, as gguf_dump --json
would list it (keys with value types and values, tensor names, ggml types and shapes; no offsets),
and the normalised report.json. The schema is proven against spec §8 by tests/toy; these snapshots
make any change to the written layout or the report a readable diff.
Update deliberately with `make golden-update`.   Run: pytest tests/golden/test_build_layout.py"""

from __future__ import annotations

import json

import gguf

from seeddelta.cli import main
from seeddelta.gguf_format.reader import field_value
from seeddelta.testing.golden import normalize
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf

# COO residual, XOR base, row scale, imatrix, dense stripped, on every FFN weight of both layers:
# every SeedΔ tensor suffix and key of the COO scheme appears.
BUILD = ["--K", "8", "--base", "--row-scale", "--strip-dense", "--layers", "0-1", "--eval-cols", "1000",
         "--eval-x", "4", "--seed", "7", "--deterministic-report"]


def _layout(path) -> dict:
    r = gguf.GGUFReader(str(path))
    keys = {}
    for name, fld in r.fields.items():
        if name.startswith("GGUF.") or name.startswith("tokenizer.ggml."):
            continue  # header counts and the synthetic vocabulary: not the builder's output
        value = field_value(fld)
        keys[name] = {"type": [gguf.GGUFValueType(t).name for t in fld.types],
                      "value": round(value, 6) if isinstance(value, float) else value}
    tensors = [{"name": t.name, "type": gguf.GGMLQuantizationType(t.tensor_type).name, "ne": [int(d) for d in t.shape]}
               for t in r.tensors]
    return {"keys": keys, "tensors": tensors}


def test_seeddelta_file_layout_and_report(tmp_path, snapshot_json):
    model = make_llama_gguf(tmp_path / "in.gguf", n_layer=2, n_embd=64, n_ff=96, seed=3)
    make_imatrix(tmp_path / "imatrix.gguf", model, seed=3)
    out, report = tmp_path / "out.gguf", tmp_path / "report.json"
    status = main(["build", "-i", str(tmp_path / "in.gguf"), "-o", str(out), "--imatrix", str(tmp_path / "imatrix.gguf"),
                   "--report-json", str(report), "-q", *BUILD])
    assert status == 0
    rep = json.loads(report.read_text())
    for key in ("input", "output", "imatrix_file", "policy_file"):  # tmp paths differ run to run
        rep.pop(key, None)
    assert {"layout": _layout(out), "report": normalize(rep)} == snapshot_json
