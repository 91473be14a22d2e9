"""Canonical policy from a builder report's final decisions (spec-policy-eval §1.10).

    { "version": 1,
      "defaults": { "enabled": false, "strip_dense": false,
                    "gating": {"metric": "cos", "min_mean": -1.0, "min_p05": -1.0},
                    "autotune": {"enabled": false} },
      "layers": { "<L>": { "tensors": { "<kind>": { "enabled": <emit>, "strip_dense": <strip applied>,
                                                   ["block": <block> if > 0], ["K": <K_budget> if emitted and > 0] }}}}}

Key order as above, 2-space indentation, trailing newline; layers ascending, kinds in build
order (gate, up, down). As the builder's `--policy-export`, every entry with layer >= 0 is
written (disabled, missing and gating-failed ones too: the defaults switch everything else
off); `emit_only` writes only emitted entries, as the original's report-to-policy script did
by default. Rebuilding with the exported policy reproduces the decisions (emit, strip, K, block).

Unlike the original script, a malformed report is an error naming the entry (an entry without
`layer`/`kind`, an unknown kind, a duplicate (layer, kind)) instead of being skipped.

A report of a build with a version-2 policy (`"policy_version": 2`) exports as version 2: every
emitted tensor's rule also carries its encoding (`base`, `row_scale`, `delta_norm_clamp`, `variant`,
read from the entry's `base_kind`, `row_scale`, `delta_norm_clamp`, `variant`), so the rebuild encodes it the same
way whatever the per-tensor values were. Everything else a rebuild needs (imatrix, seed, scheme,
value and index types, base fit settings) is the command line's, as in the original.
"""

from __future__ import annotations

import json
import os
from typing import Any

from seeddelta.errors import SeedDeltaError
from seeddelta.policy.jsontext import JSONObject, join, json_type, read_json_file
from seeddelta.policy.schema import KINDS


def _field(entry: dict[str, Any], path: str, key: str, kind: type, source: str) -> Any:
    if key not in entry:
        raise SeedDeltaError(f"{source}: {path}: report entry has no `{key}`")
    value = entry[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SeedDeltaError(f"{source}: {join(path, key)}: must be an integer, got {json_type(value)}")
    if kind is bool and not isinstance(value, bool):
        raise SeedDeltaError(f"{source}: {join(path, key)}: must be true or false, got {json_type(value)}")
    if kind is str and not isinstance(value, str):
        raise SeedDeltaError(f"{source}: {join(path, key)}: must be a string, got {json_type(value)}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise SeedDeltaError(f"{source}: {join(path, key)}: must be a number >= 0, got {json_type(value)}")
    return value


def export_policy(report: Any, source: str = "<report>", *, emit_only: bool = False) -> dict[str, Any]:
    """The canonical policy (a dict in canonical key order) of a parsed report.json."""
    if not isinstance(report, dict):
        raise SeedDeltaError(f"{source}: top level: a report must be a JSON object, got {json_type(report)}")
    weights = report.get("weights")
    if not isinstance(weights, list):
        raise SeedDeltaError(f"{source}: weights: report.weights is not a list ({json_type(weights)})")
    version = report.get("policy_version", 1)
    if version not in (1, 2) or isinstance(version, bool):
        raise SeedDeltaError(f"{source}: policy_version: must be 1 or 2, got {version!r}")
    decisions: dict[tuple[int, str], tuple[str, dict[str, Any]]] = {}
    for i, entry in enumerate(weights):
        path = join("weights", i)
        if not isinstance(entry, dict):
            raise SeedDeltaError(f"{source}: {path}: must be an object, got {json_type(entry)}")
        layer = _field(entry, path, "layer", int, source)
        kind = _field(entry, path, "kind", str, source)
        if kind not in KINDS:
            raise SeedDeltaError(f"{source}: {join(path, 'kind')}: unknown kind {kind!r} (expected {', '.join(KINDS)})")
        if layer < 0:
            continue
        emit = _field(entry, path, "emit", bool, source)
        strip = _field(entry, path, "strip_dense", bool, source)
        block = _field(entry, path, "block", int, source)
        k_budget = _field(entry, path, "K_budget", int, source)
        if (layer, kind) in decisions:
            raise SeedDeltaError(f"{source}: {path}: second entry for blk.{layer}.{kind} "
                                 f"(the first is {decisions[(layer, kind)][0]})")
        rule: dict[str, Any] = {"enabled": emit, "strip_dense": strip}
        if block > 0:
            rule["block"] = block
        if emit and k_budget > 0:
            rule["K"] = k_budget
        if emit and version == 2:
            rule["base"] = _field(entry, path, "base_kind", str, source)
            rule["row_scale"] = _field(entry, path, "row_scale", bool, source)
            rule["delta_norm_clamp"] = float(_field(entry, path, "delta_norm_clamp", float, source))
            variant = entry.get("variant", {"name": "none"})  # written only for variant weights
            if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
                raise SeedDeltaError(f"{source}: {join(path, 'variant')}: must be an object with a name, got "
                                     f"{json_type(variant)}")
            rule["variant"] = variant
            if entry.get("dense_rows"):  # a row count in the report; the policy key is the share of rows
                rule["dense_rows"] = int(entry["dense_rows"]) / int(_field(entry, path, "n_out", int, source))
            if isinstance(entry.get("delta_regime"), dict):  # as the file holds it (float32 bounds)
                rule["delta_regime"] = dict(entry["delta_regime"])
        decisions[(layer, kind)] = (path, rule)
    layers: dict[str, Any] = {}
    for layer, kind in sorted(decisions, key=lambda lk: (lk[0], KINDS.index(lk[1]))):
        rule = decisions[(layer, kind)][1]
        if emit_only and not rule["enabled"]:
            continue
        layers.setdefault(str(layer), {"tensors": {}})["tensors"][kind] = rule
    return {
        "version": version,
        "defaults": {
            "enabled": False, "strip_dense": False,
            "gating": {"metric": "cos", "min_mean": -1.0, "min_p05": -1.0},
            "autotune": {"enabled": False},
        },
        "layers": layers,
    }


def export_text(policy: dict[str, Any]) -> str:
    """The canonical text: 2-space indentation, keys in the given order, trailing newline."""
    return json.dumps(policy, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def export_report_file(path: str | os.PathLike[str], *, emit_only: bool = False) -> str:
    """Canonical policy text of a report.json file."""
    _, report = read_json_file(path, "report file")
    if isinstance(report, JSONObject) and report.duplicates:
        raise SeedDeltaError(f"{os.fspath(path)}: {report.duplicates[0]}: key given more than once")
    return export_text(export_policy(report, os.fspath(path), emit_only=emit_only))
