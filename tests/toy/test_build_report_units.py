"""Units of the builder: --layers parsing, the report's FNV hash quirk, JSON validity, ffn_score."""

from __future__ import annotations

import json

import pytest

from seeddelta.builder.report import dumps, ffn_score, fnv1a64, policy_hash, tile_fields, weight_entry
from seeddelta.errors import SeedDeltaError
from seeddelta.layers import format_layers, parse_layers


@pytest.mark.parametrize("spec,expected", [
    (None, [0, 1, 2, 3, 4, 5]), ("2-4", [2, 3, 4]), ("4-2", [2, 3, 4]),
    ("5-5", [5]), ("3", [3]), ("3,5,0-1", [0, 1, 3, 5]), (" 1 - 2 , 2 ", [1, 2]),
])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 6) == expected


def test_a_reversed_range_keeps_the_originals_meaning_and_says_so():
    heard: list[str] = []
    assert parse_layers("3-1", 6, note=heard.append) == [1, 2, 3]
    assert len(heard) == 1 and "reversed" in heard[0] and "1-3" in heard[0]
    heard.clear()
    assert parse_layers("1-3", 6, note=heard.append) == [1, 2, 3]
    assert heard == []  # the other side of the boundary: an ordered range is silent


@pytest.mark.parametrize("spec,needle", [("6", "layer 6 is outside"), ("0-9", "layer 9 is outside"),
                                          ("-1", "cannot parse"), ("1,,2", "cannot parse"), ("a", "cannot parse"),
                                          ("", "selects no layer"), ("  ", "selects no layer")])
def test_parse_layers_refuses(spec, needle):
    with pytest.raises(SeedDeltaError, match=needle):
        parse_layers(spec, 6)


def test_format_layers_inverts_parse():
    for spec in ("3,5,8-10", "0-29", "7"):
        assert format_layers(parse_layers(spec, 30)) == spec


def test_policy_hash_uses_the_originals_offset_basis():
    # the spec gives the quirky basis in hex; the hash of no bytes is the basis itself
    assert policy_hash(b"") == "fnv1a64:14650fb0739d0383"
    # with the standard basis our FNV-1a reproduces the published test vector for "a"
    assert fnv1a64(b"a", basis=14695981039346656037) == 0xAF63DC4C8601EC8C
    # one step by hand with the quirky basis: (basis ^ 0x61) * prime mod 2^64
    assert fnv1a64(b"a") == ((1469598103934665603 ^ 0x61) * 1099511628211) % 2**64


def test_report_json_is_always_valid():
    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_stub_entry_defaults_and_field_checking():
    e = weight_entry(layer=3, kind="ffn_up", decision="missing_tensor", gating_min_mean=0.45, gating_min_p05=0.3)
    assert e["reject_reason"] == "missing_tensor" and e["targets_used"] == {"tau_mean": 0.45, "tau_p05": 0.3}
    assert e["k_requested_stats"] == {"has": False, "min": 0, "max": 0, "mean": 0} and e["autotune_attempts"] == []
    with pytest.raises(KeyError):
        weight_entry(layer=1, bogus=2)


def test_ffn_score_takes_the_first_available_group():
    m = {"has_x": True, "has_w": True, "cos_mean_x_w": 0.9, "cos_p05_x_w": 0.7, "cos_mean": 0.5, "cos_p05": 0.4}
    assert ffn_score(m) == 0.7
    assert ffn_score({**m, "has_w": False, "cos_mean_x": 0.8, "cos_p05_x": 0.85}) == 0.8
    assert ffn_score({**m, "has_x": False, "has_w": False}) == 0.4


def test_tile_fields_of_the_default_flags():
    t = tile_fields(n_out=100, k_eff=16)
    assert (t["tile_rows"], t["k_per_tile"], t["k_total_per_tensor"], t["tiles_rounded_count"]) == (100, [16], 16, 0)
    t = tile_fields(n_out=100, k_eff=16, tile_rows=40)  # 40 -> 64 rows (align 32): tiles 64 + 36
    assert (t["tile_rows"], len(t["k_per_tile"]), t["tiles_rounded_count"], t["tiles_rounded_pct"]) == (64, 2, 1, 50.0)
