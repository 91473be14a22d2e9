"""`seeddelta build --delta-regime-gate rms:qP: --calibration TEXT` on the tiny model: the regime bounds
it writes are the ones `seeddelta v1 run`'s mechanism 3 computes on the same text (its path: windows of
512 over the whole text, `evaluation.regime_calibration.calibrate`, which v1 run calls), they agree
with an independent float64 quantile of the gate inputs, and the extreme quantiles are inclusive on both sides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT
from seeddelta.cli import main
from seeddelta.testing.tolerances import U32

FLAGS = ("--K", "64", "--strip-dense", "-t", "1", "-q")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory):
    """A few windows of calibration text and, through v1's path, the tiny model's gate-input quantiles on it."""
    from seeddelta.evaluation.memory import load
    from seeddelta.evaluation.regime_calibration import calibrate
    from seeddelta.evaluation.windows import text_windows

    text = tmp_path_factory.mktemp("cal") / "cal.txt"
    text.write_text(TINY_VAL_TEXT.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    base = load(TINY_MODEL, use_seeddelta=False)
    windows = text_windows(text, 512, -1, base.tokenizer).windows  # v1 run's m3: windows of 512, all of them
    assert windows.n_chunk >= 2
    layers = list(range(base.model.config.n_layer))
    inputs: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}

    def observe(layer: int, kind: str, x: torch.Tensor) -> None:  # the gate inputs, kept for the float64 oracle
        if kind == "ffn_gate":
            inputs[layer].append(x.reshape(-1, x.shape[-1]).numpy().astype(np.float64))

    base.model.ffn_observer = observe
    for i in range(windows.n_chunk):
        base.model.forward(windows.inputs[i], logits_start=windows.n_ctx - 1)
    base.model.ffn_observer = None
    v1 = calibrate(base.model, windows, layers, (0.0, 0.1, 0.9, 1.0))
    rms = {layer: np.sqrt(np.mean(np.concatenate(xs) ** 2, axis=1)) for layer, xs in inputs.items()}
    return text, v1, rms, base.model.config.n_embd, windows


def _limits(path) -> dict[int, np.ndarray]:
    return {int(t.name.split(".")[1]): np.asarray(t.data).copy() for t in GGUFReader(path).tensors
            if t.name.endswith(".ffn_gate.rg_lim")}


def test_build_writes_v1s_calibrated_bounds(tmp_path, calibration, capsys):
    text, v1, rms, n_embd, _ = calibration
    out = tmp_path / "q.gguf"
    v2, policy = tmp_path / "v2.json", tmp_path / "export.json"
    # a version-2 build (gating off) exports each tensor's encoding, its regime included
    v2.write_text('{"version": 2, "defaults": {"gating": {"min_mean": -1, "min_p05": -1}}}\n', encoding="utf-8")
    assert main(["build", "-i", str(TINY_MODEL), "-o", str(out), *FLAGS, "--delta-regime-gate", "rms:q0.1:q0.9",
                 "--calibration", str(text), "--policy", str(v2), "--policy-export", str(policy)]) == 0
    again = tmp_path / "again.gguf"  # the exported policy holds the calibrated bounds as numbers: no calibration
    assert main(["build", "-i", str(TINY_MODEL), "-o", str(again), *FLAGS, "--policy", str(policy)]) == 0
    assert again.read_bytes() == out.read_bytes()
    lim = _limits(out)
    assert sorted(lim) == sorted(int(k) for k in v1["quantiles"])  # every layer's gate, nothing else gated
    assert not any(t.name.endswith(("ffn_up.rg_lim", "ffn_down.rg_lim")) for t in GGUFReader(out).tensors)
    for layer, (lo, hi) in lim.items():
        q = v1["quantiles"][str(layer)]
        assert (float(lo), float(hi)) == (q["0.1"], q["0.9"])  # bit for bit: the same calibration
        # against an independent float64 computation: the float32 rms carries at most ~(n_embd/2 + 2)·u32
        # relative error (a sum of n_embd squares, a division, a square root), linear interpolation between
        # two neighbours keeps that relative bound, and the stored bound adds one float32 rounding
        for got, p in ((lo, 0.1), (hi, 0.9)):
            ref = float(np.quantile(rms[layer], p))
            assert abs(float(got) - ref) <= (n_embd / 2 + 4) * U32 * ref
    assert lo < hi


def test_extreme_quantiles_admit_every_calibration_token(tmp_path, calibration):
    # q0 and q1 are the smallest and largest rms of the calibration tokens: with both bounds inclusive no
    # calibration token is outside [q0, q1]. Layer 0's gate input does not depend on any compressed weight,
    # so on the compressed model it is the original's, bit for bit: it skips Δ for no token.
    from seeddelta.runtime.model import load_model

    text, v1, _, _, windows = calibration
    out = tmp_path / "ext.gguf"
    assert main(["build", "-i", str(TINY_MODEL), "-o", str(out), *FLAGS, "--delta-regime-gate", "rms:q0:q1",
                 "--calibration", str(text)]) == 0
    lo, hi = _limits(out)[0]
    assert (float(lo), float(hi)) == (v1["quantiles"]["0"]["0"], v1["quantiles"]["0"]["1"])
    model = load_model(out)
    for i in range(windows.n_chunk):
        model.forward(windows.inputs[i], logits_start=windows.n_ctx - 1)
    saved = model.conditional_delta()
    assert saved is not None
    first = saved["per_tensor"]["blk.0.ffn_gate"]
    assert first["tokens"] == windows.n_chunk * windows.n_ctx and first["skipped"] == 0
    # the other side of the boundary: a bound just above q0 (the next float32) skips at least the smallest token
    above = tmp_path / "above.gguf"
    nxt = float(np.nextafter(np.float32(lo), np.float32(math.inf)))
    assert main(["build", "-i", str(TINY_MODEL), "-o", str(above), *FLAGS, "--layers", "0",
                 "--delta-regime-gate", f"rms:{nxt!r}:"]) == 0
    model = load_model(above)
    for i in range(windows.n_chunk):
        model.forward(windows.inputs[i], logits_start=windows.n_ctx - 1)
    assert model.conditional_delta()["per_tensor"]["blk.0.ffn_gate"]["skipped"] >= 1
