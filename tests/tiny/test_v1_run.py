"""`seeddelta v1 run` on the tiny model at a CI budget (ctx 64, one window, one greedy prompt per
task): the H1 and H3b settings are measured against the original and the gate-only reference, the
exit rule is applied to what was measured, a second run is read from the cache with the same figures,
and the regress report shows the results as its "v1 mechanisms" section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from seeddelta.cli import main
from seeddelta.v1.experiments import DOWN_MAX_DPPL_PCT_2048

ARGS = ("--ctx", "64", "--chunks", "1", "--unit-chunks", "1", "--greedy-limit", "1", "-t", "1")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One result cache for this module's runs: the original's figures, its resident memory and the
    gate-only reference are the same measurement in every run (keyed by their settings), so they are
    measured once — what a user's second `v1 run --experiments …` into the same DIR does too."""
    return tmp_path_factory.mktemp("v1-cache")


def out_dir(parent: Path, shared_cache: Path) -> Path:
    """A fresh output directory whose `cache` is the module's shared cache."""
    out = parent / "o"
    out.mkdir()
    (out / "cache").symlink_to(shared_cache, target_is_directory=True)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> tuple[Path, dict, str]:
    out = out_dir(tmp_path_factory.mktemp("v1"), shared_cache)
    assert main(["v1", "run", "--out", str(out), "--experiments", "h1,h3b", *ARGS]) == 0
    return out, json.loads((out / "v1.json").read_text(encoding="utf-8")), (out / "v1.md").read_text(encoding="utf-8")


def test_rows_are_measured_against_original_and_reference(run):
    _, doc, md = run
    p = doc["profile"]
    h1 = doc["experiments"]["h1"]["rows"]
    # H1: ffn_down in one layer at a time, every K_down in each of the profile's down layers, in that order
    assert [(r["layer"], r["K_down"]) for r in h1] == [(layer, k) for layer in p["down_layers"] for k in p["K_down"]]
    for r in h1 + doc["experiments"]["h3b"]["rows"]:
        c = r["ctx"]["64"]
        assert c["vs_original"]["ci95"][0] <= c["vs_original"]["pct"] <= c["vs_original"]["ci95"][1]
        assert "vs_reference" in c and c["kld_mean"] >= 0.0
        assert r["weights_encoded"] == len(p["gate_layers"]) + 1  # the gates and one ffn_down
        assert r["greedy"]["n"] == 3  # one prompt per task
    ref = doc["reference"]
    assert ref["weights_encoded"] == len(p["gate_layers"]) and "vs_reference" not in ref["ctx"]["64"]
    # adding ffn_down at a K below n_in/2 stores fewer bytes than the dense f16 it strips
    assert all(r["file_drop_vs_reference"] > 0 for r in h1 if r["K_down"] < p["n_in"]["ffn_down"] // 2)
    assert "H1 — K_down sweep" in md and "H3b — partial strip" in md


def test_exit_rule_is_applied_to_what_was_measured(run):
    _, doc, _ = run
    v = doc["experiments"]["h1"]["verdict"]
    # ctx 2048 was not measured at this budget: nothing can pass the note's rule
    assert not v["keep"] and all("not measured at ctx 2048" in d for d in v["details"])
    assert f"+{DOWN_MAX_DPPL_PCT_2048:g} %" in v["rule"]


def test_partial_strip_rows_keep_more_dense_rows_as_the_share_grows(run):
    out, doc, _ = run
    rows = doc["experiments"]["h3b"]["rows"]
    fractions = [r["dense_rows"] for r in rows]
    assert fractions == sorted(fractions) and len(rows) == len(doc["profile"]["dense_fractions"])
    # each setting's file carries more bytes than the one before (more f16 rows beside the same SeedΔ)
    drops = [r["file_drop_vs_original"] for r in rows]
    assert drops == sorted(drops, reverse=True) and len(set(drops)) == len(drops)
    assert not list(out.glob("work/*.gguf"))  # measured files are removed


def test_second_run_is_read_from_the_cache(run, capsys):
    out, doc, _ = run
    capsys.readouterr()
    assert main(["v1", "run", "--out", str(out), "--experiments", "h1,h3b", *ARGS]) == 0
    again = json.loads((out / "v1.json").read_text(encoding="utf-8"))
    assert "from the cache" in capsys.readouterr().err
    assert again["experiments"] == doc["experiments"] and again["reference"] == doc["reference"]


def test_regress_report_shows_the_v1_section(run, tmp_path):
    out, _, _ = run
    assert main(["regress", "--out", str(out), "--steps", "b1", "--chunks", "1", "--greedy-limit", "1",
                 "-t", "1"]) in (0, 1)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## v1 mechanisms" in md and "H1 — K_down sweep" in md
    assert json.loads((out / "report.json").read_text(encoding="utf-8"))["v1"]["schema"] == "seeddelta.v1/1"


def test_unknown_experiment_is_refused_in_one_line(tmp_path, capsys):
    assert main(["v1", "run", "--out", str(tmp_path / "o"), "--experiments", "h9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "h9" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_extension_file_written_by_h3b_policy_declares_itself(tmp_path):
    from seeddelta.assets import TINY_MODEL

    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"version": 2, "defaults": {"enabled": False, "strip_dense": True,
                                                             "gating": {"min_mean": -1, "min_p05": -1}},
                                  "layers": {"1": {"enabled": True, "tensors": {
                                      "ffn_gate": {"enabled": False}, "ffn_up": {"enabled": False},
                                      "ffn_down": {"K": 256, "dense_rows": 0.125}}}}}))
    assert main(["build", "-i", str(TINY_MODEL), "-o", str(tmp_path / "o.gguf"), "--policy", str(policy), "-q",
                 "-t", "1"]) == 0
    r = GGUFReader(tmp_path / "o.gguf")
    names = {t.name: t for t in r.tensors}
    assert names["blk.1.ffn_down.dr_idx"].n_elements == 24  # ⌈0.125 · 192⌉ rows of the tiny model's down
    assert "blk.1.ffn_down.weight" not in names


def test_m6_compares_replay_weighted_with_plain_retention(tmp_path, shared_cache):
    """m6 at the CI budget: a deterministic pack, each replay row twinned with a plain-retention row,
    the weighted retention as evaluation.retention computes it from the recorded figures, and the
    verdict the exit rule gives on the recorded rows."""
    from seeddelta.evaluation.retention import replay_weighted
    from seeddelta.v1.replay import REPLAY_N, m6_verdict

    out = out_dir(tmp_path, shared_cache)
    assert main(["v1", "run", "--out", str(out), "--experiments", "m6", *ARGS]) == 0
    m6 = json.loads((out / "v1.json").read_text(encoding="utf-8"))["experiments"]["m6"]
    pack = (out / "replay-pack.json").read_bytes()
    assert len(json.loads(pack)["windows"]) == REPLAY_N == m6["pack"]["n"]
    labels = {r["label"]: r["retention"] for r in m6["rows"]}
    assert labels == {"decay α 0.5": "plain", "retention cap": "plain", "m6 decay α 0.5": "replay",
                      "m6 retention cap": "replay"}
    plain = {int(k): v for k, v in m6["retention_plain"].items()}
    impacts = {int(k): v["kld_mean"] for k, v in m6["impact"].items()}
    want = replay_weighted(plain, impacts, m6["beta"])
    assert m6["retention_replay"] == {str(k): round(v, 6) for k, v in want.items()}
    assert m6["verdict"] == m6_verdict(m6["rows"])
    for r in m6["rows"]:
        assert set(r["ctx"]) == {"64"} and "vs_reference" in r["ctx"]["64"]
        assert r["regression"]["windows"] == 1
    (out / "replay-pack.json").unlink()
    assert main(["v1", "run", "--out", str(out), "--experiments", "m6", *ARGS]) == 0
    assert (out / "replay-pack.json").read_bytes() == pack  # the same inputs make the same pack


@pytest.fixture(scope="module")
def m3_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> tuple[dict, str]:
    out = out_dir(tmp_path_factory.mktemp("m3"), shared_cache)
    assert main(["v1", "run", "--out", str(out), "--experiments", "m3", *ARGS]) == 0
    return json.loads((out / "v1.json").read_text(encoding="utf-8")), (out / "v1.md").read_text(encoding="utf-8")


def test_m3_rows_report_compute_saved_consistent_with_their_bounds(m3_run):
    from seeddelta.v1.conditional import M3_GRID, M3_MAX_DPPL_PCT_2048, M3_QUANTILES

    doc, md = m3_run
    exp = doc["experiments"]["m3"]
    p, rows = doc["profile"], exp["rows"]
    assert [(r["side"], r["quantile"]) for r in rows] == list(M3_GRID)
    cal = exp["calibration"]["quantiles"]
    for r in rows:  # the bounds written are the calibration's quantiles of each gate layer
        assert r["bounds"] == {str(g): cal[str(g)][f"{r['quantile']:g}"] for g in p["gate_layers"]}
    saved = {(r["side"], r["quantile"]): r["ctx"]["64"]["compute_saved"] for r in rows}
    pairs = {s["pairs"] for s in saved.values()}
    assert len(pairs) == 1 and pairs.pop() % len(p["gate_layers"]) == 0  # every token meets every gated gate
    # the first gated layer sees the same inputs in every setting (a regime changes only what comes after
    # it): there the bounds rising with q skip more above and fewer below, and the two sides, skipping
    # below the bound and above it, skip at most every token between them
    first = f"blk.{min(p['gate_layers'])}.ffn_gate"
    above = [saved[("above", q)]["per_tensor"][first]["skipped"] for q in M3_QUANTILES]
    below = [saved[("below", q)]["per_tensor"][first]["skipped"] for q in M3_QUANTILES]
    assert above == sorted(above) and below == sorted(below, reverse=True)
    for q in M3_QUANTILES:
        a, b = saved[("above", q)]["per_tensor"][first], saved[("below", q)]["per_tensor"][first]
        assert a["skipped"] + b["skipped"] <= a["tokens"]
    # the verdict is the stated rule applied to the measured rows
    passing = [r["label"] for r in rows if all(r["ctx"][c]["vs_reference"]["ci95"][0] <= 0 for c in ("512", "1024")
                                               if c in r["ctx"])
               and "2048" in r["ctx"] and r["ctx"]["2048"]["vs_reference"]["pct"] <= M3_MAX_DPPL_PCT_2048]
    assert exp["verdict"]["passing"] == passing and exp["verdict"]["keep"] == bool(passing)
    assert "Mechanism 3" in md and "FFN FLOPs saved @64" in md


def test_m1_measures_the_reference_gates_that_h2s_sample_skips(tmp_path, monkeypatch, shared_cache):
    """SmolLM2's profile samples every fifth layer for the gate units while its reference gates sit in
    between: m1's retention is per reference gate, so the gates the sample skips are measured too (the
    run used to stop with a KeyError on the first one)."""
    from dataclasses import replace

    import seeddelta.v1.run as v1_run

    real = v1_run.profile_for
    monkeypatch.setattr(v1_run, "profile_for", lambda model, sha: replace(real(model, sha), h2_layers=(0, 1)))
    out = out_dir(tmp_path, shared_cache)
    assert main(["v1", "run", "--out", str(out), "--experiments", "m1", *ARGS]) == 0
    doc = json.loads((out / "v1.json").read_text(encoding="utf-8"))
    gates = doc["profile"]["gate_layers"]
    assert not set(gates) & {0, 1}  # the reference gates are outside the sample, or the test proves nothing
    assert [u["layer"] for u in doc["experiments"]["gate_units"]["units"]] == sorted({0, 1, *gates})
    assert sorted(int(k) for k in doc["experiments"]["m1"]["retention"]) == sorted(gates)
