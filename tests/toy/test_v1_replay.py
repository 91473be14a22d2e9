"""Mechanism 1's retention and mechanism 6's replay pack and weighting (evaluation.retention,
evaluation.replay, v1.replay), on a synthetic model: the pack's choice against a brute-force ranking
of the windows by another forward path, both sides of the cut; the weighting's extremes and
monotonicity; the exit rule on both sides; bad input → one line, exit 2, nothing written.

Run: .venv/bin/python -m pytest tests/toy/test_v1_replay.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from seeddelta.assets import sha256_file
from seeddelta.cli import main
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.memory import load
from seeddelta.evaluation.replay import PACK_FORMAT, make_pack, read_pack, select, window_margins
from seeddelta.evaluation.retention import REPLAY_BETA, replay_weighted, retention
from seeddelta.evaluation.scan import add_retention
from seeddelta.evaluation.scoring import model_logits
from seeddelta.evaluation.windows import make_windows
from seeddelta.testing.synthetic_gguf import make_llama_gguf
from seeddelta.v1.mechanisms import retention_scores
from seeddelta.v1.replay import m6_verdict, regression

CTX, N = 16, 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    m = make_llama_gguf(d / "m.gguf", n_layer=2, n_embd=32, n_ff=48, seed=4)
    other = make_llama_gguf(d / "other.gguf", n_layer=2, n_embd=32, n_ff=48, seed=5)
    (d / "text.txt").write_text("some text with a few more words in it " * 60)
    return d, m.path, other.path


@pytest.fixture(scope="module")
def windows():
    rng = np.random.default_rng(7)
    return make_windows(rng.integers(1, 64, size=CTX * 12), CTX, None, bos_id=None)


# ---------------------------------------------------------------------------------- retention
def test_retention_is_minmax_with_its_extremes_and_equal_values():
    r = retention({"a": 0.5, "b": 0.9, "c": 0.7})
    assert r["a"] == 0.0 and r["b"] == 1.0  # lowest → 0, highest → 1 exactly
    assert r["c"] == pytest.approx(0.5, abs=1e-12)  # (0.7 − 0.5)/(0.9 − 0.5), float64 rounding only
    assert retention({"a": 0.3, "b": 0.3}) == {"a": 1.0, "b": 1.0}  # nothing tells them apart: nothing decays
    assert retention({}) == {}
    with pytest.raises(SeedDeltaError, match="not finite"):
        retention({"a": float("nan"), "b": 0.1})


def test_v1_retention_and_the_scan_use_the_same_definition():
    units = [{"layer": i, "metrics": {"cos_mean_x_w": v}} for i, v in enumerate((0.91, 0.95, 0.80, 0.99))]
    assert retention_scores(units, [0, 1, 2]) == retention({0: 0.91, 1: 0.95, 2: 0.80})
    rows = [{"layer": i, "kind": "ffn_gate", "K": 8, "retention_metric": "cos_mean_x_w", "cos_mean_x_w": v}
            for i, v in enumerate((0.91, 0.95, 0.80, 0.99))]
    rows.append({"layer": 0, "kind": "ffn_gate", "K": 16, "retention_metric": "cos_mean_x_w", "cos_mean_x_w": 0.5})
    add_retention(rows)
    assert [r["retention"] for r in rows[:4]] == [retention_scores(units, range(4))[i] for i in range(4)]
    assert rows[4]["retention"] == 1.0  # alone at its K: its own group
    assert all("retention_replay" not in r for r in rows)  # no replay impact, no weighted retention


# ---------------------------------------------------------------------------------- weighting
def test_replay_weighting_extremes():
    ret = {"a": 0.2, "b": 1.0, "c": 0.6}
    assert replay_weighted(ret, {"a": 1.0, "b": 3.0, "c": 2.0}, 0.0) == ret  # β 0: mechanism 1 exactly
    assert replay_weighted(ret, {"a": 5.0, "b": 5.0, "c": 5.0}) == ret  # equal impacts: no information
    w = replay_weighted(ret, {"a": 0.0, "b": 4.0, "c": 1.0}, 1.0)  # β 1: the replay measurement alone
    assert w == {"a": 1.0, "b": 0.0, "c": 0.75}
    w = replay_weighted(ret, {"a": 0.0, "b": 4.0, "c": 1.0})
    assert w["a"] > ret["a"] and w["b"] < ret["b"]  # least damaging raised, most damaging lowered
    assert w["b"] == pytest.approx((1 - REPLAY_BETA) * 1.0, abs=1e-15)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SeedDeltaError, match="β must be in"):
            replay_weighted(ret, {"a": 0.0, "b": 1.0, "c": 2.0}, bad)
    with pytest.raises(SeedDeltaError, match="different tensors"):
        replay_weighted(ret, {"a": 0.0, "b": 1.0})


def test_replay_weighting_is_in_range_and_non_increasing_in_the_impact():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(2, 7))
        ret = dict(enumerate(rng.random(n)))
        imp = dict(enumerate(rng.random(n) * 10))
        beta = float(rng.random())
        w = replay_weighted(ret, imp, beta)
        assert all(0.0 <= v <= 1.0 for v in w.values())
        k = int(rng.integers(n))
        more = {**imp, k: imp[k] + float(rng.random()) + 1e-3}  # one tensor damages the pack more
        assert replay_weighted(ret, more, beta)[k] <= w[k] + 1e-15  # float64 rounding of the mix


# ---------------------------------------------------------------------------------- pack selection
def test_pack_selection_equals_a_brute_force_ranking(model, windows):
    _, path, _ = model
    base = load(path, use_seeddelta=False)
    margins = window_margins(model_logits(base.model), windows)
    brute = []
    for i in range(windows.n_chunk):  # another path: every position's logits, scored ones sliced here, sorted
        logits = base.model.forward(windows.inputs[i]).detach().numpy().astype(np.float64)
        scored = np.sort(logits[windows.first:windows.n_ctx - 1], axis=1)
        brute.append(float((scored[:, -1] - scored[:, -2]).mean()))
    brute = np.array(brute)
    # float32 logits of the same model by two slicings: equal within a few float32 ulps of the logits' scale
    tol = 64 * np.finfo(np.float32).eps * max(1.0, float(np.abs(brute).max()))
    assert np.allclose(margins, brute, rtol=0, atol=tol)
    order = sorted(range(windows.n_chunk), key=lambda i: (brute[i], i))
    assert brute[order[N]] - brute[order[N - 1]] > 2 * tol  # the cut is not a tie: the test can fail
    chosen = select(margins, N)
    assert chosen == order[:N]  # the N-th is in, in rank order
    assert order[N] not in chosen  # the (N+1)-th is out
    doc = make_pack(model_logits(base.model), windows, N, model=str(path), model_sha256=sha256_file(path),
                    text="t", text_sha256="0")
    assert [w["index"] for w in doc["windows"]] == order[:N] and doc["format"] == PACK_FORMAT
    assert doc == make_pack(model_logits(base.model), windows, N, model=str(path), model_sha256=sha256_file(path),
                            text="t", text_sha256="0")  # deterministic


def test_selection_ties_go_to_the_earlier_window_and_bad_n_is_refused():
    assert select(np.array([2.0, 1.0, 1.0, 0.5]), 2) == [3, 1]
    with pytest.raises(SeedDeltaError, match="at least 1"):
        select(np.array([1.0]), 0)
    with pytest.raises(SeedDeltaError, match="more than the text's 1 window"):
        select(np.array([1.0]), 2)


def test_pack_round_trips_to_the_same_windows(model, windows, tmp_path):
    _, path, _ = model
    base = load(path, use_seeddelta=False)
    sha = sha256_file(path)
    doc = make_pack(model_logits(base.model), windows, N, model=str(path), model_sha256=sha, text="t", text_sha256="0")
    f = tmp_path / "p.json"
    f.write_text(json.dumps(doc))
    _, w = read_pack(f, sha, 64)
    idx = [x["index"] for x in doc["windows"]]
    assert np.array_equal(w.inputs, windows.inputs[idx]) and np.array_equal(w.targets, windows.targets[idx])
    assert (w.first, w.n_ctx) == (windows.first, windows.n_ctx)


# ---------------------------------------------------------------------------------- exit rule
def _row(label, retention, pct, sd, worse, flagged=0):
    ctx = {"512": {"vs_original": {"pct": pct, "sd": sd}}}
    return {"label": label, "retention": retention, "ctx": ctx,
            "regression": {"rate": (worse + flagged) / 10}}


def test_m6_exit_rule_both_sides():
    plain = _row("decay α 0.5", "plain", 1.0, 0.001, 4)
    assert m6_verdict([plain, _row("m6 decay α 0.5", "replay", 1.0, 0.001, 3)])["keep"]  # fewer, PPL equal
    assert not m6_verdict([plain, _row("m6 decay α 0.5", "replay", 1.0, 0.001, 4)])["keep"]  # not fewer
    # fewer regressions but ΔPPL higher beyond twice the larger sd (0.2 points): hurts
    assert not m6_verdict([plain, _row("m6 decay α 0.5", "replay", 1.21, 0.001, 3)])["keep"]
    assert m6_verdict([plain, _row("m6 decay α 0.5", "replay", 1.19, 0.001, 3)])["keep"]  # within it


def test_regression_rate_counts_windows_worse_than_the_reference_and_greedy_lost():
    ref = {"ctx512": {"window_delta_nll": [0.1, 0.1, 0.1]}, "ctx1024": {"window_delta_nll": [0.3]},
           "greedy": {"accuracy": 0.75, "n": 4}}
    r = regression({"ctx512": {"window_delta_nll": [0.2, 0.1, 0.0]}, "ctx1024": {"window_delta_nll": [0.31]},
                    "greedy": {"accuracy": 0.5, "n": 4}, "build": {}}, ref)
    # 0.2 > 0.1 and 0.31 > 0.3 are worse; an equal window (0.1) is not; one greedy prompt lost net
    assert r == {"windows_worse": 2, "windows": 4, "greedy_lost": 1, "greedy_n": 4, "rate": 3 / 8}
    better = regression({"ctx512": {"window_delta_nll": [0.0, 0.0, 0.0]}, "ctx1024": {"window_delta_nll": [0.0]},
                         "greedy": {"accuracy": 1.0, "n": 4}}, ref)
    assert better["rate"] == 0.0 and better["greedy_lost"] == 0  # gains are not negative regressions


# ---------------------------------------------------------------------------------- CLI
def _run(capsys, argv):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code)
    return rc, capsys.readouterr().err


def test_replay_pack_bad_input_is_one_line_exit_2_nothing_written(model, capsys):
    d, path, _ = model
    out = d / "pack_out.json"
    text = str(d / "text.txt")
    cases = [
        (["--n", "0"], "--n: must be a positive integer"),
        (["--n", "100000"], "--n 100000 is more than the text's"),
        (["-f", str(d / "nope.txt")], "text file not found"),
        (["-m", str(d / "nope.gguf")], "not found"),
        (["-o", str(d / "no" / "p.json")], "does not exist"),
    ]
    for extra, needle in cases:
        argv = ["replay-pack", "-m", path, "-f", text, "-c", "16", "-o", str(out), "-t", "1", *extra]
        rc, err = _run(capsys, argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (extra, err)
        assert not out.exists(), extra


def test_scan_replay_bad_input_is_one_line_exit_2_nothing_written(model, capsys):
    d, path, other = model
    good = d / "good_pack.json"
    assert main(["replay-pack", "-m", path, "-f", str(d / "text.txt"), "-c", "16", "--n", "2", "-o", str(good),
                 "-t", "1"]) == 0
    doc = json.loads(good.read_text())
    other_pack = d / "other_pack.json"
    assert main(["replay-pack", "-m", other, "-f", str(d / "text.txt"), "-c", "16", "--n", "2", "-o",
                 str(other_pack), "-t", "1"]) == 0
    (d / "broken.json").write_text('{"format": ')
    (d / "fmt.json").write_text(json.dumps({**doc, "format": "x"}))
    (d / "vocab.json").write_text(json.dumps({**doc, "windows": [{**doc["windows"][0],
                                                                  "inputs": [999] * doc["ctx"]}]}))
    (d / "ragged.json").write_text(json.dumps({**doc, "windows": [{**doc["windows"][0], "inputs": [1, 2]}]}))
    before = {p: sha256_file(d / p) for p in ("good_pack.json", "m.gguf")}
    out = d / "scan_out.json"
    cases = [
        (str(d / "nope.json"), "replay pack not found"),
        (str(d / "broken.json"), "is not readable JSON"),
        (str(d / "fmt.json"), "not a seeddelta.replay-pack/1 file"),
        (str(other_pack), "was made for another model"),
        (str(d / "vocab.json"), "outside the model's vocabulary"),
        (str(d / "ragged.json"), "windows"),
    ]
    for pack, needle in cases:
        argv = ["scan", "-m", path, "-f", str(d / "text.txt"), "-c", "16", "--no-cache", "--json", str(out),
                "--replay", pack, "-t", "1"]
        rc, err = _run(capsys, argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (pack, err)
        assert not out.exists(), pack
    assert {p: sha256_file(d / p) for p in before} == before  # inputs untouched
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


# ------------------------------------------------------------------ replay-pack --pack: greedy prompts
def _margins(lengths, margins):
    return [{"id": f"p{i}", "task": "t", "prompt_tokens": list(range(100 * i, 100 * i + n - 1)),
             "answer_tokens": [100 * i + 99], "answer": "a", "mean_margin": m}
            for i, (n, m) in enumerate(zip(lengths, margins, strict=True))]


def test_prompt_windows_end_with_the_prompt_and_take_the_smallest_margins():
    from seeddelta.evaluation.replay import prompt_windows

    # stream ends at 5, 10, 15, 20 tokens; ctx 10: prompt 0 (5 tokens of stream) cannot make a window,
    # prompt 1 ends exactly at 10 (eligible: the boundary's inclusive side)
    ms = _margins([5, 5, 5, 5], [0.1, 0.9, 0.5, 0.2])
    got = prompt_windows(ms, 2, 10, bos_id=7)
    assert [w["id"] for w in got] == ["p3", "p2"]  # p0 has the smallest margin but too little stream
    stream = [t for m in ms for t in m["prompt_tokens"] + m["answer_tokens"]]
    for w, end in zip(got, (20, 15), strict=True):
        assert w["inputs"] == [7] + stream[end - 9:end]  # BOS first, then the stream up to the prompt's end
        assert w["targets"] == stream[end - 10:end][10 // 2 + 1:]  # make_windows' scored half (first = ctx // 2)
    assert [w["id"] for w in prompt_windows(ms, 3, 10, bos_id=None)] == ["p3", "p2", "p1"]
    with pytest.raises(SeedDeltaError, match=r"--pack-n 4 is more than the 3 greedy prompt\(s\) with 10 tokens"):
        prompt_windows(ms, 4, 10, bos_id=None)
    # the other side of the boundary: at ctx 11 prompt 1 (10 tokens of stream) is no longer a candidate
    with pytest.raises(SeedDeltaError, match=r"more than the 2 greedy prompt"):
        prompt_windows(ms, 3, 11, bos_id=None)
    ties = _margins([5, 5, 5], [0.3, 0.3, 0.3])
    assert [w["id"] for w in prompt_windows(ties, 2, 5, bos_id=None)] == ["p0", "p1"]  # ties: the earlier prompt
    with pytest.raises(SeedDeltaError, match="--pack-n must be at least 1"):
        prompt_windows(ms, 0, 10, bos_id=None)
