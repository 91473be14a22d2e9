"""`seeddelta sweep` (B2: one layer at a time) against a second path: `build --layers L` + `kld`."""

from __future__ import annotations

import json

from seeddelta.assets import TINY_MODEL
from seeddelta.cli import main

MODEL = str(TINY_MODEL)
WINDOWS = ["--chunks", "2"]


def test_each_row_is_what_build_and_kld_measure_for_that_layer(tmp_path, capsys):
    enc = ["--K", "24", "--row-scale"]
    assert main(["sweep", "--layers", "1,6", "--json", str(tmp_path / "sweep.json"), *WINDOWS, *enc]) == 0
    rows = {r["layer"]: r for r in json.loads((tmp_path / "sweep.json").read_text())["layers"]}
    assert sorted(rows) == [1, 6]
    for layer, row in rows.items():
        sd = tmp_path / f"l{layer}.gguf"
        assert main(["build", "-i", MODEL, "-o", str(sd), "--layers", str(layer), "--strip-dense", "-q", *enc]) == 0
        kld = tmp_path / f"l{layer}.json"
        assert main(["kld", "--base", MODEL, "-m", str(sd), "--sparse", "--json", str(kld), *WINDOWS]) == 0
        k = json.loads(kld.read_text())
        # the same deterministic computations by another route: equal to the last bit
        assert row["delta_nll"] == k["delta_nll"]["mean"] and row["kld_mean"] == k["kld"]["mean"], (layer, row)
        assert row["same_top_p"] == k["same_top_p"]["mean"]
    printed = capsys.readouterr().out
    assert "safest first:" in printed


def test_a_lossless_encoding_changes_nothing(tmp_path, capsys):
    # K = n_in keeps every entry; f32 values store them exactly; no base, no row scale.
    lossless = ["--K-gate", "192", "--K-up", "192", "--K-down", "768", "--val-type", "f32"]
    assert main(["sweep", "--layers", "2", "--json", str(tmp_path / "s.json"), *WINDOWS, *lossless]) == 0
    (row,) = json.loads((tmp_path / "s.json").read_text())["layers"]
    # only float32 summation order differs (sparse product vs dense matmul): logits move by ~1e-6
    # relative (n·u32 with n ≤ 768), so |ΔNLL| and KLD stay below 1e-5 (measured: ~1e-8)
    assert abs(row["delta_nll"]) < 1e-5 and row["kld_mean"] < 1e-5, row
    # the stored SeedΔ entries (i16 index + f32 value, 6 B) are larger than the F16 weights they replace (2 B)
    assert row["bytes_saved"] < 0


def test_per_kind_units_encode_exactly_one_tensor_each(tmp_path, capsys):
    assert main(["sweep", "--layers", "5", "--per-kind", "--K", "32", "--json", str(tmp_path / "k.json"),
                 "--chunks", "1"]) == 0
    rows = json.loads((tmp_path / "k.json").read_text())["layers"]
    assert [(r["layer"], r["kinds"]) for r in rows] == [(5, ["ffn_gate"]), (5, ["ffn_up"]), (5, ["ffn_down"])]
    # closed form of the bytes: the F16 weight stripped (2·n_out·n_in) minus the COO stored for it
    # (n_out·K entries of an i16 index and an f16 value, 4 B), nothing else touched
    gate_up = 2 * 768 * 192 - 768 * 32 * 4
    down = 2 * 192 * 768 - 192 * 32 * 4
    assert [r["bytes_saved"] for r in rows] == [gate_up, gate_up, down]
    assert len({r["delta_nll"] for r in rows}) == 3, "three different files, three different effects"


def test_bad_kinds_is_one_line_exit_2(capsys):
    assert main(["sweep", "--kinds", "gate,bogus", "--chunks", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kinds" in err[0], err


def test_stack_adds_the_safest_units_one_at_a_time(tmp_path, capsys):
    enc = ["--K", "24"]
    assert main(["sweep", "--layers", "1,2,6", "--stack", "--json", str(tmp_path / "s.json"), *WINDOWS, *enc]) == 0
    data = json.loads((tmp_path / "s.json").read_text())
    rows, stack = data["layers"], data["stack"]
    order = sorted(rows, key=lambda r: r["delta_nll"])
    assert [s["added"] for s in stack] == [f"blk.{r['layer']}" for r in order]
    # step 1 is the safest unit's own file: the same measurement to the last bit
    assert stack[0]["delta_nll"] == order[0]["delta_nll"] and stack[0]["kld_mean"] == order[0]["kld_mean"]
    # bytes are additive over units: each tensor's stripped and added bytes do not depend on the others
    running = 0
    for step, unit in zip(stack, order, strict=True):
        running += unit["bytes_saved"]
        assert step["bytes_saved"] == running
    # the last step is all three layers: what build --layers 1,2,6 + kld measure by another route
    sd, kld = tmp_path / "all.gguf", tmp_path / "all.json"
    assert main(["build", "-i", MODEL, "-o", str(sd), "--layers", "1,2,6", "--strip-dense", "-q", *enc]) == 0
    assert main(["kld", "--base", MODEL, "-m", str(sd), "--sparse", "--json", str(kld), *WINDOWS]) == 0
    assert stack[-1]["delta_nll"] == json.loads(kld.read_text())["delta_nll"]["mean"]
    assert "one more at each step" in capsys.readouterr().out


def test_without_the_logits_cache_the_rows_are_the_same(tmp_path, capsys, monkeypatch):
    from seeddelta.evaluation import sweep

    def rows(name: str) -> list[dict]:
        assert main(["sweep", "--layers", "2", "--K", "24", "--json", str(tmp_path / name), *WINDOWS]) == 0
        return json.loads((tmp_path / name).read_text())["layers"]

    cached = rows("cached.json")
    monkeypatch.setattr(sweep, "CACHE_LIMIT_BYTES", 0)
    assert rows("recomputed.json") == cached  # the base's forward is deterministic: same numbers either way
    assert "recomputing them for every unit" in capsys.readouterr().err
