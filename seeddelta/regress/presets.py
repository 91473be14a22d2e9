"""Presets: policy files that declare which v1 criteria they must meet and the figures they reached.

A preset is an ordinary policy file (`seeddelta policy check` reads it; `build --policy` uses it and
warns about, then ignores, the one extra top-level key) with a ``regress`` block:

```json
"regress": {
  "description": "what the preset is for",
  "model_sha256": "<sha256 of the model it was made for>",
  "encoding": {"base": true, "row_scale": true, "imatrix": true},
  "criteria": ["greedy_pass", "memory_drop"],
  "figures": {"settings": {"chunks": -1, "greedy_limit": 0},
              "ctx512": {"delta_nll": 0.0061}, "ctx1024": {...}, "ctx2048": {...},
              "file_bytes": 8645312, "greedy_accuracy": 0.9267}
}
```

`encoding` holds the build flags a version-1 policy cannot (the XOR base, the row scale, whether the
imatrix of the regress run is used); `criteria` names entries of `criteria.V1_CRITERIA`; `figures`
are the measured values the preset is held to (a change may not make them worse beyond the
measured spread, see `criteria`), valid for the evaluation settings stated with them. The report of
every run carries each preset's measured figures in exactly this form, so declaring new figures is
a deliberate copy, never automatic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seeddelta.errors import SeedDeltaError
from seeddelta.policy.jsontext import read_json_file
from seeddelta.regress.criteria import CRITERIA, FIGURE_FLOOR, FIGURE_SPREAD_Z, PAGE_BYTES, V1_CRITERIA
from seeddelta.regress.stats import bootstrap_windows, pct_from_nll

PRESET_DIR = Path(__file__).resolve().parent / "presets"
ENCODING_KEYS = frozenset({"base", "row_scale", "imatrix"})
BLOCK_KEYS = frozenset({"description", "model_sha256", "encoding", "criteria", "figures"})


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str
    model_sha256: str
    policy_text: str  # the file without its `regress` block: what the builder reads
    encoding: Mapping[str, bool]
    criteria: tuple[str, ...]
    figures: Mapping[str, Any]


def shipped_presets() -> list[Path]:
    return sorted(PRESET_DIR.glob("*.json"))


def load_preset(path: str | Path) -> Preset:
    """A preset file, checked; errors name the file and the key."""
    p = Path(path)
    _, doc = read_json_file(p, "preset file")

    def fail(where: str, message: str) -> SeedDeltaError:
        return SeedDeltaError(f"{p}: {where}: {message}")

    if not isinstance(doc, dict) or not isinstance(doc.get("regress"), dict):
        raise fail("regress", "a preset is a policy with a `regress` object (criteria, figures)")
    block = dict(doc["regress"])
    unknown = sorted(set(block) - BLOCK_KEYS)
    if unknown:
        raise fail(f"regress.{unknown[0]}", f"unknown key (expected {', '.join(sorted(BLOCK_KEYS))})")
    criteria = block.get("criteria", [])
    if not isinstance(criteria, list) or not all(isinstance(c, str) for c in criteria):
        raise fail("regress.criteria", "must be a list of criterion names")
    bad = [c for c in criteria if c not in CRITERIA]
    if bad:
        raise fail("regress.criteria", f"unknown criterion {bad[0]!r} (expected {', '.join(CRITERIA)})")
    encoding = block.get("encoding", {})
    if not isinstance(encoding, dict) or set(encoding) - ENCODING_KEYS or \
            not all(isinstance(v, bool) for v in encoding.values()):
        raise fail("regress.encoding", f"must be an object of booleans among {', '.join(sorted(ENCODING_KEYS))}")
    figures = block.get("figures", {})
    if not isinstance(figures, dict):
        raise fail("regress.figures", "must be an object")
    policy = {k: v for k, v in doc.items() if k != "regress"}
    return Preset(name=p.stem, path=p, description=str(block.get("description", "")),
                  model_sha256=str(block.get("model_sha256", "")), policy_text=json.dumps(policy, indent=2) + "\n",
                  encoding=dict(encoding), criteria=tuple(criteria), figures=dict(figures))


# ---------------------------------------------------------------------------------- judging a result
def criterion_result(name: str, result: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """One criterion measured on one preset's result: value, threshold, interval, pass/fail (or n/a)."""
    c = CRITERIA[name]
    if c.ctx is not None:
        row = result.get(f"ctx{c.ctx}")
        if row is None:
            return {"criterion": name, "pass": False, "value": None, "why": f"not measured at ctx {c.ctx}"}
        boot = bootstrap_windows(row["window_delta_nll"])
        pct = pct_from_nll(row["delta_nll"])
        return {"criterion": name, "value": pct, "threshold": c.max_delta_ppl_pct, "unit": "ΔPPL %",
                "ci95": [pct_from_nll(boot["lo95"]), pct_from_nll(boot["hi95"])],
                "pass": pct <= float(c.max_delta_ppl_pct or 0.0)}
    if name == "greedy_pass":
        g = result.get("greedy")
        if g is None:
            return {"criterion": name, "pass": False, "value": None, "why": "no greedy pack for this model"}
        return {"criterion": name, "value": f"{g['verdict']}, {g['flagged']} flagged of {g['n']}",
                "accuracy": g["accuracy"], "pass": g["verdict"] == "PASS" and g["flagged"] == 0,
                "why": "; ".join(g["reasons"])}
    if name == "memory_drop":
        m, bm = result.get("memory"), base.get("memory")
        if m is None or bm is None or bm.get("rss_anon_load_delta_bytes") is None:
            return {"criterion": name, "pass": False, "value": None, "why": "resident memory not measured"}
        stripped = result["build"]["emitted"] > 0
        file_drop = m["file_bytes"] - bm["file_bytes"]
        rss_drop = m["rss_anon_load_delta_bytes"] - bm["rss_anon_load_delta_bytes"]
        needed = FIGURE_SPREAD_Z * max(int(bm.get("rss_spread_bytes", 0)), PAGE_BYTES)
        why = "" if stripped else "no weight encoded and stripped"
        if stripped and file_drop < 0 and -needed <= rss_drop < 0:
            why = f"resident memory fell by {-rss_drop} B, within the measurement's spread (needs > {needed:.0f} B)"
        return {"criterion": name, "value": {"file_bytes": file_drop, "rss_bytes": rss_drop},
                "rss_drop_needed": needed, "pass": stripped and file_drop < 0 and rss_drop < -needed, "why": why}
    raise SeedDeltaError(f"internal: no rule for criterion {name}")


def measured_figures(result: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """The figures block this result would declare."""
    out: dict[str, Any] = {"settings": dict(settings)}
    for key, row in result.items():
        if key.startswith("ctx") and isinstance(row, dict):
            out[key] = {"delta_nll": round(row["delta_nll"], 6)}
    out["file_bytes"] = result["build"]["file_bytes"]
    if result.get("greedy"):
        out["greedy_accuracy"] = round(result["greedy"]["accuracy"], 6)
    return out


def figure_checks(preset: Preset, result: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Declared figures against this run: `worse` when beyond the measured spread (criteria docstring)."""
    fig = preset.figures
    if not fig:
        return []
    if fig.get("settings") != dict(settings):
        return [{"figure": "all", "status": "not comparable",
                 "why": f"declared for {fig.get('settings')}, measured with {dict(settings)}"}]
    checks = []
    for key, declared in fig.items():
        if key.startswith("ctx") and key in result:
            row = result[key]
            sd = bootstrap_windows(row["window_delta_nll"])["sd"]
            allowed = max(FIGURE_SPREAD_Z * sd, FIGURE_FLOOR)
            delta = row["delta_nll"] - float(declared["delta_nll"])
            checks.append({"figure": f"{key} ΔNLL", "declared": declared["delta_nll"], "measured": row["delta_nll"],
                           "allowed_increase": allowed, "status": "worse" if delta > allowed else "ok"})
    if "file_bytes" in fig:
        measured = result["build"]["file_bytes"]
        checks.append({"figure": "file bytes", "declared": fig["file_bytes"], "measured": measured,
                       "allowed_increase": 0, "status": "worse" if measured > fig["file_bytes"] else "ok"})
    if "greedy_accuracy" in fig and result.get("greedy"):
        g = result["greedy"]
        a = float(fig["greedy_accuracy"])
        allowed = FIGURE_SPREAD_Z * math.sqrt(max(a * (1 - a), 0.0) / max(g["n"], 1))
        checks.append({"figure": "greedy accuracy", "declared": a, "measured": g["accuracy"],
                       "allowed_decrease": allowed, "status": "worse" if g["accuracy"] < a - allowed else "ok"})
    return checks


def judge(preset: Preset, result: Mapping[str, Any], base: Mapping[str, Any], settings: Mapping[str, Any]
          ) -> dict[str, Any]:
    """Every v1 criterion measured (declared ones gate), the figure checks, and the preset's verdict."""
    rows = [{**criterion_result(c.name, result, base), "declared": c.name in preset.criteria} for c in V1_CRITERIA]
    checks = figure_checks(preset, result, settings)
    failures = [f"{preset.name}: {r['criterion']} declared but not met" for r in rows if r["declared"] and not r["pass"]]
    failures += [f"{preset.name}: {c['figure']} worse than declared ({c['measured']} vs {c['declared']})"
                 for c in checks if c["status"] == "worse"]
    saves = result["build"]["file_bytes"] < result["build"]["input_bytes"]
    return {"preset": preset.name, "description": preset.description, "criteria_declared": list(preset.criteria),
            "criteria": rows, "figures": checks, "measured_figures": measured_figures(result, settings),
            "saves_bytes": saves, "bytes_saved": result["build"]["input_bytes"] - result["build"]["file_bytes"],
            "input_bytes": result["build"]["input_bytes"], "weights_encoded": result["build"]["emitted"],
            "meets_ppl": all(r["pass"] for r in rows if r["criterion"].startswith("ppl_")),
            "result": "FAIL" if failures else "PASS", "failures": failures}


def no_saving_preset_meets_ppl(judged: Sequence[Mapping[str, Any]]) -> bool:
    return not any(j["saves_bytes"] and j["meets_ppl"] for j in judged)
