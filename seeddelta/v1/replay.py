"""The v1 plan's mechanism 6, replay-directed retention, as a measured experiment (`m6`).

* The **replay pack**: the REPLAY_N windows of REPLAY_CTX tokens of the calibration text (never the
  evaluation text: choosing on it would leak into the scores; the evaluation text when there is no
  calibration) the original model is most fragile on (evaluation.replay: smallest mean top-1/top-2
  logit margin). Written to <out>/replay-pack.json.
* The **replay impact** of each gate tensor of the gate-only reference: the gate unit alone at
  K_gate (as `seeddelta scan --replay` encodes it, same imatrix) measured on the pack (KLD mean).
* **ret_replay** = (1 − β)·ret + β·(1 − imp) (evaluation.retention.replay_weighted), used by mechanism 1's
  decay (α M6_ALPHA) and hard cap exactly as mechanism 1's plain retention is.
* The note's exit rule ("keep if it reduces regression rate without hurting PPL"), written as
  `m6_verdict`: a replay setting is kept against its plain-retention twin (same α, or both the cap)
  when its regression rate — the share of windows, over every context, whose NLL is above the gate-only
  reference's on the same window, plus the greedy prompts lost net of the reference — is lower, and its ΔPPL vs the original is at
  no context higher than the twin's beyond twice the larger window-bootstrap sd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seeddelta.assets import sha256_file
from seeddelta.evaluation.replay import ReplayMeasure, impact, make_pack, read_pack
from seeddelta.evaluation.retention import REPLAY_BETA, replay_weighted
from seeddelta.evaluation.scoring import model_logits
from seeddelta.evaluation.unit_cache import UnitCache
from seeddelta.evaluation.windows import text_windows
from seeddelta.outputs import write_json_atomic
from seeddelta.v1.profiles import Profile

REPLAY_CTX = 128  # short windows: many candidates to choose from in a calibration text of a few thousand tokens
REPLAY_N = 8
M6_ALPHA = 0.5  # mechanism 1's stronger decay (its α 0.25 moved ΔPPL by a third as much)


def replay_pack(model: Path, text: Path, out: Path, base: Any) -> tuple[Path, dict[str, Any]]:
    """The run's replay pack (made once; deterministic, so a re-run writes the same bytes)."""
    path = out / "replay-pack.json"
    sha = sha256_file(model)
    if not path.is_file():
        w = text_windows(text, REPLAY_CTX, -1, base.tokenizer).windows
        doc = make_pack(model_logits(base.model), w, min(REPLAY_N, w.n_chunk), model=str(model), model_sha256=sha,
                        text=str(text), text_sha256=sha256_file(text))
        write_json_atomic(path, doc, "replay pack")
    doc, _ = read_pack(path, sha, base.model.config.n_vocab)
    return path, doc


def replay_impacts(model: Path, imatrix: Path | None, encoding: Mapping[str, Any], p: Profile, pack: Path,
                   base: Any, cache_dir: Path, work: Path, threads: int) -> dict[int, dict[str, Any]]:
    """Each reference gate tensor alone at K_gate, measured on the pack (cached per unit with the pack's hash)."""
    from seeddelta.builder.options import BuildOptions
    from seeddelta.regress.measure import EVAL_COLS, EVAL_X

    enc = dict(encoding)
    use_imatrix = bool(enc.pop("imatrix", False))
    template = BuildOptions(input=str(model), output="", strip_dense=True, eval_cols=EVAL_COLS, eval_x=EVAL_X,
                            imatrix=str(imatrix) if use_imatrix and imatrix else None, progress=False, threads=threads,
                            K=p.K_gate, **enc)
    _, windows = read_pack(pack, None, base.model.config.n_vocab)
    work.mkdir(parents=True, exist_ok=True)
    measure = ReplayMeasure(model, base, windows, template, work, cache=UnitCache(cache_dir), threads=threads,
                            pack_sha256=sha256_file(pack))
    tasks = [({(layer, "ffn_gate"): p.K_gate}, f"replay_{layer}") for layer in p.gate_layers]
    return {layer: impact(r) for layer, r in zip(p.gate_layers, measure.measure_all(tasks), strict=True)}


def replay_retention(plain: Mapping[int, float], impacts: Mapping[int, Mapping[str, Any]],
                     beta: float = REPLAY_BETA) -> dict[int, float]:
    return replay_weighted(plain, {k: float(v["kld_mean"]) for k, v in impacts.items()}, beta)


def regression(result: Mapping[str, Any], ref: Mapping[str, Any]) -> dict[str, Any]:
    """Regressions against the gate-only reference the mechanism is applied to: the windows (every context)
    whose NLL is above the reference's on the same window, and the greedy prompts lost net of the
    reference's accuracy. (Against the original the count saturates: the reference already makes every
    tiny-model window worse.)"""
    worse = total = 0
    for key, m in result.items():
        if key.startswith("ctx") and isinstance(m, dict) and key in ref:
            worse += sum(1 for a, b in zip(m["window_delta_nll"], ref[key]["window_delta_nll"], strict=True) if a > b)
            total += len(m["window_delta_nll"])
    g, gr = result.get("greedy") or {}, ref.get("greedy") or {}
    n = int(g.get("n", 0) or 0)
    lost = max(0, round(n * (float(gr.get("accuracy", 0.0)) - float(g.get("accuracy", 0.0))))) if g and gr else 0
    return {"windows_worse": worse, "windows": total, "greedy_lost": lost, "greedy_n": n,
            "rate": (worse + lost) / (total + n) if total + n else None}


def twin_key(label: str) -> str:
    return label.removeprefix("m6 ")


def m6_verdict(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The note's exit for mechanism 6 (see the module text)."""
    plain = {twin_key(r["label"]): r for r in rows if r["retention"] == "plain"}
    pairs, good = [], []
    for r in rows:
        if r["retention"] != "replay" or twin_key(r["label"]) not in plain:
            continue
        t = plain[twin_key(r["label"])]
        fewer = r["regression"]["rate"] is not None and t["regression"]["rate"] is not None and \
            r["regression"]["rate"] < t["regression"]["rate"]
        hurt = []
        for ctx, c in r["ctx"].items():
            tc = t["ctx"].get(ctx)
            if tc is not None and c["vs_original"]["pct"] > tc["vs_original"]["pct"] + \
                    100 * 2 * max(c["vs_original"]["sd"], tc["vs_original"]["sd"]):
                hurt.append(ctx)
        pairs.append({"replay": r["label"], "plain": t["label"], "rate_replay": r["regression"]["rate"],
                      "rate_plain": t["regression"]["rate"], "fewer_regressions": fewer, "ppl_hurt_at": hurt})
        if fewer and not hurt:
            good.append(r["label"])
    return {"keep": bool(good), "passing": good, "pairs": pairs,
            "rule": "regression rate vs gate-only (windows worse + greedy prompts lost) below the plain-retention twin's, "
                    "ΔPPL vs original at no context above the twin's beyond twice the larger bootstrap sd"}
