"""Version-2 policy key `variant`: per-tensor variant settings, validated in one line, exported and rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seeddelta.builder.options import VariantSpec
from seeddelta.cli import main
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.policy.load import parse_policy
from seeddelta.policy.resolve import resolve
from seeddelta.testing.synthetic_gguf import make_imatrix, make_llama_gguf

DOC = {"version": 2, "defaults": {"K": 3, "strip_dense": True, "gating": {"min_mean": -1}},
       "ranges": [{"layers": "1", "variant": "sdq"}],
       "layers": {"0": {"tensors": {"ffn_down": {"variant": {"name": "sdq", "base_type": "Q8_0", "coding": "c8",
                                                             "rotate": True}}}}}}


def test_the_variant_key_resolves_per_tensor_with_its_source():
    p = parse_policy(json.dumps(DOC), source="p.json")
    down0 = resolve(p, 0, "ffn_down")
    assert down0.variant == VariantSpec("sdq", "Q8_0", rotate=True, coding="c8")
    assert down0.source["variant"] == "layers.0.tensors.ffn_down"
    assert resolve(p, 0, "ffn_gate").variant == VariantSpec() and resolve(p, 0, "ffn_gate").source["variant"] == "baseline"
    assert resolve(p, 1, "ffn_up").variant == VariantSpec("sdq")  # a name alone: every other field's default
    assert down0.to_json()["variant"]["base_type"] == "Q8_0"


@pytest.mark.parametrize("variant,needle", [
    ("sdx", "layers.0.variant: unknown variant 'sdx'"),
    ({"name": "sdq", "base_type": "Q2_K"}, "layers.0.variant: quantized base type 'Q2_K' cannot be encoded"),
    ({"name": "sdq", "colour": 1}, "layers.0.variant.colour: unknown variant key"),
    ({"base_type": "Q4_0"}, "layers.0.variant.name: missing"),
    ({"name": "sdq", "rotate": "yes"}, "layers.0.variant.rotate: must be true or false"),
    ({"name": "sdq", "quantizer": "gptq", "base_type": "Q5_0"}, "quantizer gptq supports base types"),
    (3, 'layers.0.variant: must be a variant name ("none", "sdq") or an object'),
])
def test_bad_variant_values_are_one_line_naming_the_place(variant, needle):
    doc = {"version": 2, "layers": {"0": {"variant": variant}}}
    with pytest.raises(SeedDeltaError, match=None) as info:
        parse_policy(json.dumps(doc), source="p.json")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_under_version_1_variant_is_an_unknown_key():
    p = parse_policy(json.dumps({"version": 1, "defaults": {"variant": "sdq"}}), source="p.json")
    assert any("unknown key in policy: variant" in w for w in p.warnings)
    assert resolve(p, 0, "ffn_gate").variant == VariantSpec()


def test_mixed_build_exports_and_rebuilds_byte_for_byte(tmp_path):
    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=2, n_embd=64, n_ff=96, seed=2)
    make_imatrix(tmp_path / "im.gguf", m, seed=2)
    pol = tmp_path / "p.json"
    pol.write_text(json.dumps(DOC))
    out, rep, exp = tmp_path / "o.gguf", tmp_path / "o.json", tmp_path / "exported.json"
    common = ["-i", m.path, "--imatrix", str(tmp_path / "im.gguf"), "-q", "-t", "1", "--deterministic-report"]
    assert main(["build", *common, "-o", str(out), "--report-json", str(rep), "--policy", str(pol),
                 "--policy-export", str(exp)]) == 0
    g = GGUFModel(out)
    assert g.has("blk.0.ffn_gate.d_idx") and not g.has("blk.0.ffn_gate.sdq_base")  # plain where not set
    assert g.tensor_type("blk.0.ffn_down.sdq_base").name == "Q8_0" and g.has("blk.0.ffn_down.sdq_rot")
    assert all(g.has(f"blk.1.{k}.sdq_base") for k in ("ffn_gate", "ffn_up", "ffn_down"))
    assert g.get("seeddelta.variant") == "sdq" and g.get("seeddelta.blk.0.ffn_gate.variant") is None
    entries = {(w["layer"], w["kind"]): w for w in json.loads(rep.read_text())["weights"]}
    assert entries[(0, "ffn_down")]["variant"]["coding"] == "c8" and "variant" not in entries[(0, "ffn_gate")]
    again = tmp_path / "again.gguf"
    assert main(["build", *common, "-o", str(again), "--policy", str(exp)]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert json.loads(exp.read_text())["layers"]["0"]["tensors"]["ffn_gate"]["variant"] == {"name": "none"}
    # both families in one file run: plain and variant weights side by side
    (tmp_path / "t.txt").write_text("a b c d e f g " * 80)
    assert main(["ppl", "-m", str(out), "-f", str(tmp_path / "t.txt"), "-c", "32", "--chunks", "1", "-q", "-t", "1",
                 "--sparse"]) == 0
    Path(tmp_path / "t.txt").unlink()


def test_k_zero_is_a_variants_base_alone_and_refused_for_plain_seeddelta():
    ok = {"version": 2, "defaults": {"K": 0, "variant": "sdq"}}
    assert resolve(parse_policy(json.dumps(ok), source="p.json"), 0, "ffn_down").K == 0
    # a plain weight (here layer 1, where a rule turns the variant off) cannot have K 0
    doc = {"version": 2, "defaults": {"K": 0, "variant": "sdq"}, "layers": {"1": {"variant": "none"}}}
    with pytest.raises(SeedDeltaError) as info:
        resolve(parse_policy(json.dumps(doc), source="p.json"), 1, "ffn_gate")
    assert str(info.value) == ("p.json: defaults.K: K 0 is only for a variant weight (the quantized base alone); "
                               "blk.1.ffn_gate is plain SeedΔ")
    # version 1 (the original's schema) keeps K >= 1
    with pytest.raises(SeedDeltaError, match="defaults.K"):
        parse_policy(json.dumps({"version": 1, "defaults": {"K": 0}}), source="p.json")
