"""`seeddelta v1 run`: the v1 experiments on a model, cached and resumable, written as `v1.json`
(the regress report's "v1 mechanisms" section reads it from the same --out) and `v1.md`.

Measurements go through the regress suite's Evaluator and result cache (<out>/cache, keyed by the
model, text, calibration, settings and measuring code), so an interrupted run resumes and a finished
one is re-read in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seeddelta.assets import sha256_file
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.result_cache import ResultCache, code_fingerprint
from seeddelta.evaluation.workers import Pool
from seeddelta.regress.baseline import RSS_REPEATS
from seeddelta.regress.measure import Evaluator, fresh_process_memory, run_specs
from seeddelta.regress.stats import bootstrap_windows
from seeddelta.regress.suite import RegressSettings, calibration_text, pack_items
from seeddelta.v1 import EXPERIMENTS
from seeddelta.v1 import experiments as X
from seeddelta.v1 import mechanisms as M
from seeddelta.v1.profiles import Profile, profile_for

Progress = Callable[[str], None]
SCHEMA = "seeddelta.v1/1"


@dataclass(frozen=True)
class V1Settings:
    model: Path
    text: Path
    out: Path
    calibration: Path | None = None
    pack: Path | None = None
    chunks: int = -1  # windows per context of the table rows (-1: all)
    unit_chunks: int = -1  # windows at ctx 512 for H2's single units
    ctxs: tuple[int, ...] = (512, 1024, 2048)
    greedy_limit: int = 10  # greedy prompts per task for the table rows (0: all)
    experiments: tuple[str, ...] = EXPERIMENTS
    jobs: int = 1
    threads: int = 0
    use_cache: bool = True

    def public(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "unit_chunks": self.unit_chunks, "ctxs": list(self.ctxs),
                "greedy_limit": self.greedy_limit, "experiments": list(self.experiments)}


def _imatrix(ev: Evaluator, calibration: Path | None, out: Path) -> Path | None:
    from seeddelta.evaluation.activations import collect_imatrix
    from seeddelta.evaluation.windows import text_windows
    from seeddelta.gguf_format.imatrix_file import write_imatrix

    if calibration is None:
        return None
    path = out / "imatrix.gguf"
    if not path.is_file():
        w = text_windows(calibration, 512, -1, ev.base.tokenizer).windows
        sums, counts = collect_imatrix(ev.base.model, w)
        write_imatrix(path, sums, counts, [str(calibration)], w.n_chunk, w.n_ctx)
    return path


def repair_profile(p: Profile, h2_units: Sequence[Mapping[str, Any]]) -> Profile:
    """H3a/H3b repair ffn_down where H2 measured it most harmful (when that layer is not already the last
    H1 layer, H1 measures it too): a clamp or a partial strip can only show an effect where there is damage."""
    from dataclasses import replace

    worst = max(h2_units, key=lambda u: (u["delta_nll"], -u["layer"]))["layer"]
    return p if p.down_layers[-1] == worst else replace(p, down_layers=(*[x for x in p.down_layers if x != worst], worst))


def _unit(s: X.Setting, r: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """One single-tensor unit: its ΔNLL at ctx 512 with the window-bootstrap interval and its metrics."""
    w = next(w for w in r["build"]["weights"] if w["emit"] and w["kind"] == kind)
    m = r["ctx512"]
    b = bootstrap_windows(m["window_delta_nll"])
    keys = [k for k, _ in X.H2_METRICS] + [k for k in M.GATE_METRICS if k not in dict(X.H2_METRICS)]
    return {"layer": s.params["layer"], "kind": kind, "delta_nll": m["delta_nll"], "ci95": [b["lo95"], b["hi95"]],
            "kld_mean": m["kld_mean"], "bytes_saved": r["build"]["bytes_saved"], "metrics": {k: w.get(k) for k in keys}}


def base_memory(model: Path, cache: ResultCache, note: Progress) -> dict[str, Any]:
    """File size and resident memory of the original (sparse runtime, as every row), RSS_REPEATS fresh
    processes: the median is the reference, max − min the spread."""
    hit = cache.get("v1-base-memory", {"repeats": RSS_REPEATS})
    if hit is not None:
        return hit
    note(f"[v1] resident memory of the original, {RSS_REPEATS} fresh processes")
    rss = sorted(int(fresh_process_memory(model, "sparse")["rss_anon_load_delta_bytes"]) for _ in range(RSS_REPEATS))
    out = {"file_bytes": model.stat().st_size, "rss_anon_load_delta_bytes": rss[len(rss) // 2],
           "rss_spread_bytes": rss[-1] - rss[0], "rss_repeats": RSS_REPEATS}
    cache.put("v1-base-memory", {"repeats": RSS_REPEATS}, out)
    return out


def _m6(settings: V1Settings, p: Profile, units: Sequence[Mapping[str, Any]], ev: Evaluator,
        encoding: Mapping[str, Any], evals: tuple[tuple[int, int], ...], greedy: int | None, calibration: Path | None,
        run: Callable[[Sequence[X.Setting], str], list[dict[str, Any]]], ref: Mapping[str, Any],
        mem: Mapping[str, Any]) -> dict[str, Any]:
    """Mechanism 6: m1's decay (α M6_ALPHA) and cap with plain retention and with replay-weighted retention."""
    from seeddelta.v1 import replay as R

    base = ev.base
    pack, pack_doc = R.replay_pack(settings.model, calibration or settings.text, settings.out, base)
    impacts = R.replay_impacts(settings.model, ev.imatrix, encoding, p, pack, base, settings.out / "cache" / "replay-units",
                               settings.out / "work" / "replay", settings.threads)
    plain = M.retention_scores(units, p.gate_layers)
    weighted = R.replay_retention(plain, impacts)
    ratios = M.delta_norm_ratios(str(settings.model), str(ev.imatrix) if ev.imatrix else None, encoding, p, p.gate_layers)
    chosen, _ = M.m1(p, units, ratios, encoding, evals, greedy, alphas=(R.M6_ALPHA,))
    replayed, _ = M.m1(p, units, ratios, encoding, evals, greedy, ret=weighted, experiment="m6", alphas=(R.M6_ALPHA,))
    rows = []
    for s, r in zip([*chosen, *replayed], run([*chosen, *replayed], "v1 m6"), strict=True):
        rows.append({**X.row(s, r, ref, mem), "retention": "replay" if s.experiment == "m6" else "plain",
                     "regression": R.regression(r, ref)})
    return {"pack": {k: pack_doc[k] for k in ("text", "ctx", "n", "candidates", "cut_margin", "criterion")},
            "impact": {str(k): v for k, v in impacts.items()}, "beta": R.REPLAY_BETA, "alpha": R.M6_ALPHA,
            "retention_plain": {str(k): round(v, 6) for k, v in plain.items()},
            "retention_replay": {str(k): round(v, 6) for k, v in weighted.items()},
            "rows": rows, "verdict": R.m6_verdict(rows)}


def _m3(p: Profile, ev: Evaluator, calibration: Path | None, cache: ResultCache, encoding: Mapping[str, Any],
        evals: tuple[tuple[int, int], ...], greedy: int | None,
        run: Callable[[Sequence[X.Setting], str], list[dict[str, Any]]], ref: Mapping[str, Any],
        mem: Mapping[str, Any], note: Progress) -> dict[str, Any]:
    """Mechanism 3: calibrate each gate's input-statistic quantiles on the calibration text (cached), then
    measure the gate-only reference with Δ conditional on them."""
    from seeddelta.evaluation.regime_calibration import CALIBRATION_CTX, calibrate
    from seeddelta.evaluation.windows import text_windows
    from seeddelta.v1 import conditional as C

    if calibration is None:
        raise SeedDeltaError("--experiments m3: needs a calibration text (--calibration) for its quantiles")
    key = {"layers": list(p.gate_layers), "quantiles": list(C.quantiles(p)), "statistic": C.M3_STATISTIC}
    cal = cache.get("v1-m3-calibration", key)
    if cal is None:
        note("[v1] m3: input-statistic quantiles of the gate layers on the calibration text")
        w = text_windows(calibration, CALIBRATION_CTX, -1, ev.base.tokenizer).windows
        cal = calibrate(ev.base.model, w, p.gate_layers, C.quantiles(p), C.M3_STATISTIC)
        cache.put("v1-m3-calibration", key, cal)
    chosen = C.m3(p, cal, encoding, evals, greedy)
    rows = [C.add_compute_saved(X.row(s, r, ref, mem), r) for s, r in zip(chosen, run(chosen, "v1 m3"), strict=True)]
    return {"calibration": cal, "rows": rows, "verdict": C.m3_verdict(rows)}


def run_v1(settings: V1Settings, progress: Progress | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    note = progress or (lambda _m: None)
    bad = [x for x in settings.experiments if x not in EXPERIMENTS]
    if bad:
        raise SeedDeltaError(f"--experiments: unknown experiment {bad[0]!r} (expected {', '.join(EXPERIMENTS)})")
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    sha = sha256_file(settings.model)
    p = profile_for(str(settings.model), sha)
    rs = RegressSettings(model=settings.model, text=settings.text, out=out, calibration=settings.calibration,
                         pack=settings.pack)
    calibration = calibration_text(rs, out)
    if "m3" in settings.experiments and calibration is None:  # before anything is measured
        raise SeedDeltaError("--experiments m3: needs a calibration text (--calibration) for its quantiles")
    ev = Evaluator(settings.model, settings.text, None, pack_items(rs), out / "work", settings.threads)
    cache = ResultCache(out / "cache", {"model_sha256": sha, "text_sha256": sha256_file(settings.text),
                                        "calibration_sha256": sha256_file(calibration) if calibration else None,
                                        "pack": [x.id for x in ev.pack]}, enabled=settings.use_cache)
    ev.imatrix = _imatrix(ev, calibration, out)
    encoding = {"base": True, "row_scale": True, "imatrix": ev.imatrix is not None}
    evals = tuple((c, settings.chunks) for c in settings.ctxs)
    greedy = settings.greedy_limit if ev.pack else None
    mem = base_memory(settings.model, cache, note)

    def run(settings_: Sequence[X.Setting], step: str) -> list[dict[str, Any]]:
        return run_specs(ev, [s.spec for s in settings_], cache, step,
                         pool=Pool(jobs=settings.jobs, threads=settings.threads), progress=note)

    ref_setting = X.reference(p, encoding, evals, greedy)
    (ref,) = run([ref_setting], "v1 reference")
    doc: dict[str, Any] = {
        "schema": SCHEMA, "model": {"path": str(settings.model), "sha256": sha, "n_layer": p.n_layer},
        "text": str(settings.text), "calibration": str(calibration) if calibration else None,
        "settings": settings.public(), "profile": p.public(), "encoding": encoding,
        "code_fingerprint": code_fingerprint()[:16], "base_memory": mem, "rss_drop_needed": X.rss_needed(mem),
        "reference": X.row(ref_setting, ref, None, mem), "experiments": {},
    }
    table_steps: dict[str, Callable[[Profile, Mapping[str, Any], tuple[tuple[int, int], ...], int | None],
                                    list[X.Setting]]] = {"h1": X.h1, "h3a": X.h3a, "h3b": X.h3b}

    def rows_of(chosen: list[X.Setting], step: str) -> list[dict[str, Any]]:
        return [X.row(s, r, ref, mem) for s, r in zip(chosen, run(chosen, step), strict=True)]

    exps = doc["experiments"]
    names = list(settings.experiments)
    if "h2" in names:  # first: H1 also sweeps, and H3a/H3b repair, the layer where H2 measured down worst
        names.insert(0, names.pop(names.index("h2")))
    for name in names:
        if name in table_steps:
            rows = rows_of(table_steps[name](p, encoding, evals, greedy), f"v1 {name}")
            exps[name] = {"rows": rows, "verdict": X.down_exit_rule(rows, mem)}
            if name in ("h3a", "h3b") and "h1" in exps:
                exps[name]["effect"] = X.mechanism_effect(rows, exps["h1"]["rows"])
        elif name == "h2":
            chosen = X.h2_units(p, encoding, settings.unit_chunks)
            units = [_unit(s, r, "ffn_down") for s, r in zip(chosen, run(chosen, "v1 h2"), strict=True)]
            exps["h2"] = {"units": units, "analysis": X.h2_analysis(units)}
            p = repair_profile(p, units)
            doc["profile"] = p.public()
        elif name == "m2":
            rows = rows_of(M.m2(p, encoding, evals, greedy), "v1 m2")
            exps["m2"] = {"rows": rows, "verdict": M.m2_verdict(rows)}
        elif name in ("m4", "m5", "m1", "m6"):
            if "gate_units" not in exps:
                chosen = M.gate_units(p, encoding, settings.unit_chunks)
                exps["gate_units"] = {"units": [_unit(s, r, "ffn_gate") for s, r in
                                                zip(chosen, run(chosen, "v1 gate units"), strict=True)]}
            units = exps["gate_units"]["units"]
            measured = {u["layer"] for u in units}
            missing = [x for x in p.gate_layers if x not in measured] if name in ("m1", "m6") else []
            if missing:  # m1/m6's retention is per reference gate; H2's sample may skip some
                extra = M.gate_units(p, encoding, settings.unit_chunks, missing)
                units = sorted(units + [_unit(s, r, "ffn_gate") for s, r in
                                        zip(extra, run(extra, "v1 gate units"), strict=True)], key=lambda u: u["layer"])
                exps["gate_units"]["units"] = units
            if name == "m6":
                exps["m6"] = _m6(settings, p, units, ev, encoding, evals, greedy, calibration, run, ref, mem)
            elif name == "m1":
                ratios = M.delta_norm_ratios(str(settings.model), str(ev.imatrix) if ev.imatrix else None, encoding,
                                             p, p.gate_layers)
                chosen, info = M.m1(p, units, ratios, encoding, evals, greedy)
                rows = rows_of(chosen, "v1 m1")
                exps["m1"] = {**info, "rows": rows, "verdict": M.m1_verdict(rows)}
            elif name == "m4":
                chosen, selection = M.m4(p, units, encoding, evals, greedy)
                rows = rows_of(chosen, "v1 m4")
                exps["m4"] = {"selection": selection, "rows": rows, "verdict": M.m4_verdict(rows, selection)}
            else:
                rows = rows_of(M.m5(p, units, encoding, evals, greedy), "v1 m5")
                exps["m5"] = {"rows": rows, "verdict": M.m5_verdict(rows)}
        elif name == "m3":  # conditional Δ (seeddelta.v1.conditional)
            exps["m3"] = _m3(p, ev, calibration, cache, encoding, evals, greedy, run, ref, mem, note)
        elif name == "m7":  # without H2 only llama.cpp's band is measured
            h2 = exps["h2"]["units"] if "h2" in exps else None
            harmless = None if h2 is None else [u["layer"] for u in h2 if not u.get("harmful")]
            rows = rows_of(M.m7(p, harmless, encoding, evals, greedy), "v1 m7")
            exps["m7"] = {"rows": rows, "verdict": X.down_exit_rule(rows, mem)}
            if h2 is not None:
                exps["m7"]["agreement"] = M.band_agreement(p.n_layer, exps["h2"]["analysis"]["harmful_layers"],
                                                           [u["layer"] for u in h2])
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    return doc
