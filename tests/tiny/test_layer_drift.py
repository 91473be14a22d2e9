"""`seeddelta kld` says where the difference enters: the residual stream's drift after every block.

Oracle: blocks before the first SeedΔ layer compute exactly what the base computes (same weights,
same code, same order), so their drift is exactly zero; the first encoded block is where it appears."""

from __future__ import annotations

import json

import pytest

from seeddelta.assets import TINY_MODEL
from seeddelta.cli import main
from seeddelta.testing.tolerances import F64_REORDER

MODEL = str(TINY_MODEL)


def _kld(tmp_path, candidate: str, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert main(["kld", "--base", MODEL, "-m", candidate, "--chunks", "2", "--sparse", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_identical_models_drift_nowhere(tmp_path, capsys):
    drift = _kld(tmp_path, MODEL, "same")["layer_drift"]
    assert [row["layer"] for row in drift] == list(range(8))
    for row in drift:
        # the same float32 computation twice: bit-identical states, so the distance is exactly 0
        assert row["rel_l2_mean"] == 0.0 and row["rel_l2_p95"] == 0.0, row
        # cos of a vector with itself in float64: 1 up to a few ulps of the norms' rounding
        assert row["cos_mean"] == pytest.approx(1.0, abs=F64_REORDER) and row["norm_ratio_mean"] == 1.0, row
    assert "Hidden state after each block" in capsys.readouterr().out


def test_drift_is_zero_before_the_first_encoded_block_and_appears_there(tmp_path, capsys):
    first = 3
    sd = tmp_path / "layer3.gguf"
    assert main(["build", "-i", MODEL, "-o", str(sd), "--layers", f"{first}-7", "--K", "16", "--strip-dense", "-q"]) == 0
    capsys.readouterr()
    drift = _kld(tmp_path, str(sd), "layer3")["layer_drift"]
    for row in drift[:first]:
        assert row["rel_l2_mean"] == 0.0 and row["rel_l2_p95"] == 0.0, row
    # K = 16 of 192 keeps a twelfth of each row: the FFN of block 3 changes visibly (measured rel L2 ≈ 0.1);
    # 1e-3 is far above float32 noise (~1e-7) and far below the effect
    assert drift[first]["rel_l2_mean"] > 1e-3, drift[first]
    assert all(row["rel_l2_mean"] > 1e-3 for row in drift[first:])
