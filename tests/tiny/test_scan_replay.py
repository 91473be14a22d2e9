"""`seeddelta scan --replay` on the tiny model: every unit's `retention` is mechanism 1's function of
its metric over the units of its kind and K (v1.mechanisms.retention_scores), and its
`replay_impact` equals `build` of that unit + KL divergence on the pack's tokens computed by another
path (the CLI build, both models loaded and compared directly on the pack's windows).

Run: .venv/bin/python -m pytest tests/tiny/test_scan_replay.py
"""

from __future__ import annotations

import json

import pytest

from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT
from seeddelta.cli import main
from seeddelta.evaluation.memory import load
from seeddelta.evaluation.replay import read_pack
from seeddelta.evaluation.retention import replay_weighted
from seeddelta.evaluation.scoring import kl_divergence, model_logits
from seeddelta.testing import thresholds as T
from seeddelta.v1.mechanisms import retention_scores

MODEL = str(TINY_MODEL)
ONE_THREAD = ["-t", "1"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("scan_replay")
    pack = d / "pack.json"
    assert main(["replay-pack", "-m", MODEL, "-f", str(TINY_VAL_TEXT), "-c", "32", "--n", "3", "-o", str(pack),
                 *ONE_THREAD]) == 0
    assert main(["scan", "--layers", "2,3,5", "--kinds", "gate", *T.ENCODING_FLAGS, "-c", "64", "--chunks", "2",
                 "--replay", str(pack), "--cache", str(d / "cache"), "--json", str(d / "scan.json"),
                 *ONE_THREAD]) == 0
    yield d, pack, json.loads((d / "scan.json").read_text())
    torch.set_num_threads(before)


def test_scan_retention_is_the_v1_function(scan):
    _, _, doc = scan
    units = doc["units"]
    metric = units[0]["retention_metric"]
    assert all(u["retention_metric"] == metric for u in units)
    v1 = retention_scores([{"layer": u["layer"], "metrics": {"cos_mean_x_w": u[metric]}} for u in units],
                          [u["layer"] for u in units])
    assert {u["layer"]: u["retention"] for u in units} == v1
    assert sorted(v1.values())[0] == 0.0 and sorted(v1.values())[-1] == 1.0  # three distinct values: both ends
    w = replay_weighted(v1, {u["layer"]: u["replay_impact"]["kld_mean"] for u in units})
    assert {u["layer"]: u["retention_replay"] for u in units} == w
    assert doc["replay"]["windows"] == 3


def test_replay_impact_equals_build_and_kld_of_that_unit_on_the_pack(scan, capsys):
    d, pack, doc = scan
    row = next(u for u in doc["units"] if u["layer"] == 3)
    policy = d / "one.json"
    policy.write_text(json.dumps({"version": 1, "defaults": {"enabled": False, "gating": {"min_mean": -1}},
                                  "layers": {"3": {"tensors": {"ffn_gate": {"enabled": True, "strip_dense": True,
                                                                            "K": row["K"]}}}}}))
    out = d / "one.gguf"
    assert main(["build", "-i", MODEL, "-o", str(out), "--policy", str(policy), *T.ENCODING_FLAGS, "--eval-cols",
                 "64", "--eval-x", "32", "-q", *ONE_THREAD]) == 0
    base = load(MODEL, use_seeddelta=False)
    _, windows = read_pack(pack, None, base.model.config.n_vocab)
    cand = load(out, mode="sparse")
    s = kl_divergence(model_logits(base.model), model_logits(cand.model), windows).summary()
    # the same deterministic computations by another route: equal to the last bit
    assert (row["replay_impact"]["kld_mean"], row["replay_impact"]["delta_nll"], row["replay_impact"]["same_top_p"]) \
        == (s["kld"]["mean"], s["delta_nll"]["mean"], s["same_top_p"]["mean"])
    assert row["replay_impact"]["kld_mean"] > 0  # the unit does change the model on the pack
    capsys.readouterr()


def test_a_replay_pack_of_other_windows_is_another_cache_entry(scan, capsys):
    d, pack, doc = scan
    other = d / "pack2.json"
    assert main(["replay-pack", "-m", MODEL, "-f", str(TINY_VAL_TEXT), "-c", "32", "--n", "2", "-o", str(other),
                 *ONE_THREAD]) == 0
    assert main(["scan", "--layers", "3", "--kinds", "gate", *T.ENCODING_FLAGS, "-c", "64", "--chunks", "2",
                 "--replay", str(other), "--cache", str(d / "cache"), "--json", str(d / "scan2.json"),
                 *ONE_THREAD]) == 0
    err = capsys.readouterr().err
    row = json.loads((d / "scan2.json").read_text())["units"][0]
    first = next(u for u in doc["units"] if u["layer"] == 3)
    assert "cached" in err  # the text windows' unit was read back ...
    assert row["replay_impact"] != first["replay_impact"]  # ... the other pack's was measured, not served stale
    assert row["delta_nll"] == first["delta_nll"]
    assert row["retention"] == 1.0  # derived from the cached figures when written: alone in its group


def test_autogate_retention_cap_builds_at_the_replay_capped_K(scan, capsys):
    # loose limits and no greedy: every candidate is kept, so the policy holds every admitted unit
    from seeddelta.policy.autogate import retention_cap

    d, _, doc = scan
    pol = d / "capped.json"
    assert main(["autogate", "--scan", str(d / "scan.json"), "-m", MODEL, "-o", str(pol), "--no-greedy",
                 "--max-delta-nll", "10", "--min-gap", "0", "--gate-cos-threshold", "-1", "--gate-cos-p05-threshold",
                 "-1", "--retention-cap", "--retention", "replay", "--cache", str(d / "cache"), *ONE_THREAD]) == 0
    policy = json.loads(pol.read_text())
    record = json.loads((d / "capped.autogate.json").read_text())
    want = {u["layer"]: retention_cap(u["K"], u["retention_replay"]) for u in doc["units"]}
    got = {int(layer): v["tensors"]["ffn_gate"]["K"] for layer, v in policy["layers"].items()
           if v["tensors"].get("ffn_gate", {}).get("enabled")}
    assert got == want
    assert len(set(want.values())) > 1 or len({u["retention_replay"] for u in doc["units"]}) == 1
    assert min(want.values()) < doc["units"][0]["K"]  # the least retained unit is cut (to half its K)
    assert record["retention_cap"]["retention"] == "replay"
    assert {s["layer"]: s["K_built"] for s in record["steps"]} == want
    capsys.readouterr()


def test_replay_pack_adds_the_greedy_prompts_with_the_smallest_answer_margin(tmp_path, capsys):
    import numpy as np
    import torch

    from seeddelta.assets import TINY_TEST_PACK
    from seeddelta.evaluation.greedy import greedy_decode
    from seeddelta.evaluation.pack import DEFAULT_MAX_NEW, limit_per_task, load_pack
    from seeddelta.testing.tolerances import U32

    pack = tmp_path / "pack.json"
    assert main(["replay-pack", "-m", MODEL, "-f", str(TINY_VAL_TEXT), "-c", "32", "--n", "2", "--pack",
                 str(TINY_TEST_PACK), "--pack-n", "3", "--pack-limit", "2", "-o", str(pack), *ONE_THREAD]) == 0
    doc = json.loads(pack.read_text())
    base = load(MODEL, use_seeddelta=False)
    _, windows = read_pack(pack, None, base.model.config.n_vocab)
    assert windows.n_chunk == 5 and [w.get("source") for w in doc["windows"]] == [None, None, *["greedy pack"] * 3]
    items = limit_per_task(load_pack(TINY_TEST_PACK), 2)
    margins = doc["prompts"]["margins"]
    assert doc["prompts"]["considered"] == len(items) == len(margins)
    # the margins by another route: the greedy answer re-derived one token at a time from full forwards (no
    # cache), the top-1/top-2 gap at each decision; float32 logits of differently shaped matmuls differ by
    # reduction order, at most ~n_embd·u32 of the largest logit per term: allowed 4·n_embd·u32·max|logit|
    n_embd = base.model.config.n_embd
    tok = base.tokenizer
    for it in items:
        ids = list(tok.encode(it.prompt, add_bos=bool(getattr(tok, "add_bos", True))))
        gaps, scale, answer = [], 0.0, greedy_decode(base.model, tok, it.prompt, DEFAULT_MAX_NEW)
        seq = list(ids)
        for j in range(len(answer.ids) + (1 if answer.stop == "eos" else 0)):
            logits = base.model.forward(np.array(seq, dtype=np.int64), logits_start=len(seq) - 1)[-1].to(torch.float64)
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            scale = max(scale, float(logits.abs().max()))
            if j < len(answer.ids):
                assert int(torch.argmax(logits)) == answer.ids[j]  # the same greedy path
                seq.append(answer.ids[j])
        assert abs(margins[it.id] - float(np.mean(gaps))) <= 4 * n_embd * U32 * scale
    # the chosen prompts: the 3 smallest margins among those with 32 tokens of pack stream before their end
    chosen = [w["id"] for w in doc["windows"][2:]]
    assert chosen == doc["prompts"]["ids"]
    lengths = np.cumsum([len(tok.encode(it.prompt, add_bos=False)) + len(greedy_decode(base.model, tok, it.prompt,
                                                                                      DEFAULT_MAX_NEW).ids)
                         for it in items])
    eligible = [it.id for it, end in zip(items, lengths, strict=True) if end >= 32]
    assert chosen == sorted(eligible, key=lambda i: (margins[i], eligible.index(i)))[:3]
    for w in doc["windows"][2:]:  # each window ends with its prompt and the original's answer (or their tail)
        item = next(it for it in items if it.id == w["id"])
        text, full = tok.decode(w["inputs"][1:]), item.prompt + w["answer"]
        assert text.endswith(full) or full.endswith(text)
        assert w["answer"] and full.endswith(w["answer"])
    capsys.readouterr()
