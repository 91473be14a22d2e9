"""The evaluation commands end to end (`seeddelta ppl | kld | imatrix | greedy`) on synthetic GGUFs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGUFValueType

from seeddelta.cli import main
from seeddelta.codec import encode as codec
from seeddelta.evaluation.windows import make_windows, tokenize_text, window_bos
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.writer import KV, write_model_copy
from seeddelta.runtime.model import load_model, load_tokenizer
from seeddelta.testing import synthetic_gguf as synthetic

SHAPE = dict(n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, vocab=259)
KINDS = ("ffn_gate", "ffn_up", "ffn_down")
TEXT = "".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps\n" for i in range(12))  # ~500 byte tokens


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ev")
    dense = str(d / "dense.gguf")
    synthetic.make_llama_gguf(dense, dtype="F16", std=0.25, seed=21, **SHAPE)
    # no "▁" prefix and BOS added, like the tiny model's vocabulary (synthetic files lack the keys)
    lossy = str(d / "lossy.gguf")
    m = GGUFModel(dense)
    add = []
    for layer in range(m.n_layer):
        for kind in KINDS:
            sdw = codec.encode(m.ffn_weight(layer, kind), codec.EncodeConfig(K=8, base="xor_circulant"))
            add += [(f"blk.{layer}.{kind}.{s}", a) for s, a in sdw.tensors().items()]
    write_model_copy(m, lossy, add_tensors=add,
                             set_keys=[KV("seeddelta.enabled", True, GGUFValueType.BOOL)])
    text = d / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"dense": dense, "lossy": lossy, "text": str(text), "dir": str(d)}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ppl_command_reports_llama_perplexity_numbers(env: dict[str, str], capsys, tmp_path) -> None:
    js = tmp_path / "ppl.json"
    rc, out, _ = run_cli(["ppl", "-m", env["lossy"], "-f", env["text"], "-c", "64", "--chunks", "3",
                          "--json", str(js), "-q"], capsys)
    assert rc == 0
    data = json.loads(js.read_text())
    # independent recomputation: same windows, logits of every position, scored half only
    model = load_model(env["lossy"])
    tok = load_tokenizer(env["lossy"])
    w = make_windows(tokenize_text(tok, TEXT), 64, 3, window_bos(tok))
    nll = []
    for c in range(3):
        lp = torch.log_softmax(model.forward(w.inputs[c]).double(), -1).numpy()
        toks = tokenize_text(tok, TEXT)[c * 64:(c + 1) * 64]
        nll += [-lp[j, toks[j + 1]] for j in range(32, 63)]
    ppl = math.exp(np.mean(nll))
    assert data["ppl"] == pytest.approx(ppl, rel=1e-6)  # same f32 logits, float64 statistics
    assert data["se"] == pytest.approx(ppl * np.std(nll) / math.sqrt(len(nll) - 1), rel=1e-5)
    assert data["n_tokens_scored"] == 3 * 31 and data["chunks"] == 3 and data["ctx"] == 64
    assert data["model"]["seeddelta_projections"] == 6 and data["model"]["path"] == env["lossy"]
    assert data["model"]["memory"]["weights_bytes"] == model.weight_nbytes()
    assert data["throughput"]["prompt_tok_per_s"] > 0 and data["throughput"]["decode_tok_per_s"] > 0
    assert f"Final estimate: PPL = {data['ppl']:.4f} +/- {data['se']:.5f}" in out


def test_ppl_sparse_and_forced_dense(env: dict[str, str], capsys, tmp_path) -> None:
    res = {}
    for name, extra in (("mat", []), ("sparse", ["--sparse"]), ("dense", ["--no-seeddelta"])):
        js = tmp_path / f"{name}.json"
        assert main(["ppl", "-m", env["lossy"], "-f", env["text"], "-c", "64", "--chunks", "2", "-q",
                     "--json", str(js), *extra]) == 0
        res[name] = json.loads(js.read_text())
    capsys.readouterr()
    assert res["sparse"]["model"]["seeddelta_projections"] == 6 and res["dense"]["model"]["seeddelta_projections"] == 0
    # the two SeedΔ modes: same function up to f32 rounding (relative 1e-4 on PPL is ~100× that bound)
    assert res["sparse"]["ppl"] == pytest.approx(res["mat"]["ppl"], rel=1e-4)
    assert abs(res["dense"]["ppl"] - res["mat"]["ppl"]) > 1e-3 * res["mat"]["ppl"]  # K = 8: really different


@pytest.mark.parametrize("argv,needle", [
    (["ppl", "-c", "4096"], "needs at least 2·n_ctx = 8192"),
    (["ppl", "-m", "/nonexistent.gguf"], "model file not found: /nonexistent.gguf"),
    (["ppl", "-f", "/nonexistent.txt"], "text file not found: /nonexistent.txt"),
])
def test_user_errors_are_one_line_exit_2(env: dict[str, str], capsys, argv: list[str], needle: str) -> None:
    full = list(argv)
    if "-m" not in full:
        full += ["-m", env["dense"]]
    if "-f" not in full:
        full += ["-f", env["text"]]
    rc, _, err = run_cli(full, capsys)
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def test_kld_identical_is_zero_and_lossy_is_positive(env: dict[str, str], capsys, tmp_path) -> None:
    js = tmp_path / "same.json"
    assert main(["kld", "--base", env["dense"], "-m", env["dense"], "-f", env["text"], "-c", "64",
                 "--chunks", "2", "--json", str(js)]) == 0
    same = json.loads(js.read_text())
    assert same["kld"]["mean"] == 0.0 and same["same_top_p"]["mean"] == 1.0
    assert same["delta_nll"]["mean"] == 0.0 and same["n_tokens"] == 2 * 31
    js2 = tmp_path / "lossy.json"
    assert main(["kld", "--base", env["dense"], "-m", env["lossy"], "-f", env["text"], "-c", "64",
                 "--chunks", "2", "--json", str(js2)]) == 0
    lossy = json.loads(js2.read_text())
    capsys.readouterr()
    assert lossy["kld"]["mean"] > 0 and lossy["kld"]["p99"] >= lossy["kld"]["percentiles"]["p50"]
    assert lossy["model"]["seeddelta_projections"] == 6 and lossy["base"]["seeddelta_projections"] == 0
    assert lossy["delta_nll"]["se"] > 0
    assert lossy["ppl_ratio"] == pytest.approx(lossy["ppl_model"]["ppl"] / lossy["ppl_base"]["ppl"], rel=1e-9)


def test_imatrix_matches_inputs_recorded_at_the_projections(env: dict[str, str], capsys, tmp_path) -> None:
    from seeddelta.gguf_format.imatrix_file import read_imatrix

    out = tmp_path / "imat.gguf"
    assert main(["imatrix", "-m", env["dense"], "-f", env["text"], "-o", str(out), "-c", "64", "--chunks", "3"]) == 0
    capsys.readouterr()
    imat = read_imatrix(out)
    # independent path: wrap the projections themselves and record what they are called with
    model = load_model(env["dense"])
    seen: dict[str, list[np.ndarray]] = {}
    for i, layer in enumerate(model.layers):
        for kind, proj in list(layer.ffn.items()):
            def rec(x, _p=proj, _n=f"blk.{i}.{kind}.weight"):
                seen.setdefault(_n, []).append(x.double().numpy().reshape(-1, x.shape[-1]))
                return _p(x)
            rec.kind = proj.kind  # type: ignore[attr-defined]
            rec.nbytes = proj.nbytes  # type: ignore[attr-defined]
            layer.ffn[kind] = rec
    tok = load_tokenizer(env["dense"])
    w = make_windows(tokenize_text(tok, TEXT), 64, 3, window_bos(tok))
    for c in range(3):
        model.forward(w.inputs[c])
    assert set(imat.values) == set(seen) and len(seen) == 6
    for name, xs in seen.items():
        x = np.concatenate(xs)
        assert x.shape[0] == 3 * 64
        # the file stores Σx² (f32) and counts; the reader gives the mean E[x²]
        np.testing.assert_allclose(imat.values[name], (x * x).mean(0), rtol=1e-5)


def test_greedy_uses_seeddelta_and_reports_flags(env: dict[str, str], capsys, tmp_path) -> None:
    pack = tmp_path / "pack.jsonl"
    items = [{"id": f"t-{i}", "task": "copy" if i % 2 else "sum", "prompt": f"line {i}: the quick", "answer": "x"}
             for i in range(4)]
    pack.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    res = {}
    for name, extra in (("sd", []), ("dense", ["--no-seeddelta"])):
        js = tmp_path / f"g-{name}.json"
        rc = main(["greedy", "-m", env["lossy"], "--pack", str(pack), "--max-new", "12", "--json", str(js), *extra])
        res[name] = (rc, json.loads(js.read_text()))
    capsys.readouterr()
    sd, dense = res["sd"][1], res["dense"][1]
    assert sd["model"]["seeddelta_projections"] == 6 and dense["model"]["seeddelta_projections"] == 0
    # the SeedΔ file differs from its dense weights (K = 8), so the generations must differ somewhere
    assert [r["generated_tokens"] for r in sd["result"]["items"]] != [r["generated_tokens"] for r in dense["result"]["items"]] \
        or [r["answer"] for r in sd["result"]["items"]] != [r["answer"] for r in dense["result"]["items"]]
    for rc, data in res.values():
        r = data["result"]
        assert r["n"] == 4 and set(r["tasks"]) == {"copy", "sum"}
        assert (rc == 0) == (data["verdict"]["result"] == "PASS") == (r["flagged"] == 0)
        for item in r["items"]:  # a random model never says "x": every answer is wrong
            assert not item["exact"]
            assert ("no_stop" in item["flags"]) == (item["stop"] == "max_new")
