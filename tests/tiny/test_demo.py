"""The main job (`seeddelta demo`, what `make run` runs) end to end on a short budget."""

from __future__ import annotations

import json
import os

from seeddelta.assets import TINY_MODEL
from seeddelta.cli import main
from seeddelta.tiny.dataset import heldout_texts


def test_demo_writes_a_summary_consistent_with_its_files_and_never_calibrates_on_heldout(tmp_path, capsys):
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--skip-toy", "--chunks", "2", "--limit", "4", "--strict"])
    summary = json.loads((out / "summary.json").read_text())
    # --strict: the exit status is the verdict's, whatever this budget does to the model
    assert status == (0 if summary["greedy"]["verdict"]["result"] == "PASS" else 1)

    model = TINY_MODEL
    sd = out / "model_seeddelta.gguf"
    # sizes come from the files themselves
    assert summary["file_bytes"] == {"original": os.path.getsize(model), "seeddelta": os.path.getsize(sd)}
    # K-gate/up 64 of n_in 192 and K-down 256 of 768 keep a third of each row at 4 B (i16 index +
    # f16 value) against 6 B for three dense f16 values: every stripped tensor shrinks, so the file does
    report = json.loads((out / "report.json").read_text())
    assert summary["weights_encoded"] == summary["weights_stripped"] == len(report["weights"]) == 8 * 3
    assert summary["file_bytes"]["seeddelta"] < summary["file_bytes"]["original"]
    assert summary["weight_memory_bytes"]["seeddelta"] < summary["weight_memory_bytes"]["original"]
    kld = json.loads((out / "kld.json").read_text())
    assert summary["kld"] == kld["kld"] and summary["ppl"]["seeddelta"] == kld["ppl_model"]
    # a lossy budget: the SeedΔ model differs from the original, and the summary says by how much
    assert summary["kld"]["mean"] > 0
    # where: the drift after every block, and the same encoding on one layer at a time
    assert [r["layer"] for r in summary["layer_drift"]] == list(range(8))
    sweep = json.loads((out / "sweep.json").read_text())
    assert summary["one_layer_at_a_time"] == sweep["layers"] and [r["layer"] for r in sweep["layers"]] == list(range(8))
    assert summary["safest_layers_together"] == sweep["stack"] and len(sweep["stack"]) == 8
    # the chosen subset is the longest safest-first prefix within the ΔNLL bound, and its files say so
    chosen = summary["chosen"]
    within = [i for i, s in enumerate(sweep["stack"]) if s["delta_nll"] <= chosen["max_delta_nll"]]
    if within:
        expected = sorted(int(s["added"].removeprefix("blk.")) for s in sweep["stack"][: within[-1] + 1])
        assert chosen["layers"] == expected
        assert chosen["file_bytes"] == os.path.getsize(out / "model_seeddelta_chosen.gguf") < summary["file_bytes"]["original"]
    else:
        assert chosen["layers"] == []
    # calibration text is drawn from the training distribution: no held-out sample may appear in it
    calib = (out / "calibration.txt").read_text()
    assert not [t for t in heldout_texts() if t in calib]
    printed = capsys.readouterr().out
    assert "== SeedΔ on the tiny model: summary" in printed and summary["greedy"]["verdict"]["result"] in printed
    # it ends with what to run next on one's own model: the same steps, with the budget used here
    nxt = printed[printed.index("== next: the same on your own model"):]
    for step in ("seeddelta imatrix -m MODEL.gguf", "seeddelta build -i MODEL.gguf", "seeddelta kld --base MODEL.gguf",
                 "seeddelta sweep -m MODEL.gguf", "seeddelta greedy -m MODEL-chosen.gguf"):
        assert step in nxt, step
    assert "--K-gate 64 --K-up 64 --K-down 256" in nxt
