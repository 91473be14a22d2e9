"""`seeddelta regress`: the user's plan B1–B5 and the v1 success criteria on a model, as one report.

Steps (each cached per measurement under <out>/cache, so an interrupted run resumes):

* **b1** — the original: PPL ± se at ctx 512/1024/2048, the determinism check, the spread of the
  estimate over windows, the greedy pack, prompt and decode throughput, file size and resident memory;
* **b2**, **b3**, **b4** — `regress.units`;
* **b5** — strict gating: `seeddelta scan` + `seeddelta autogate` with the original autogate's
  defaults (ffn_gate only, cos_mean_x_w ≥ 0.70, p05 ≥ 0.50, never adjacent layers, each step kept
  only within ΔNLL 0.01 and a greedy PASS), its policy judged on `criteria.b5_criteria` (the greedy criterion, when the model has a greedy pack); and every
  preset whose name contains `strict` (thresholds alone, as a policy);
* **presets** — every preset made for this model: the v1 criteria it declares, its figures;
* **equal-bytes** — `evaluation.equal_bytes`.

The verdict FAILs (exit status 1) when a preset misses a criterion it declares or a figure worsens
beyond the measured spread. `report.json`, `report.md` and PNG plots go to --out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from seeddelta.assets import TINY_MODEL, sha256_file, tiny_test_pack
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation import equal_bytes as eb
from seeddelta.evaluation.activations import collect_imatrix
from seeddelta.evaluation.greedy import PackItem, load_pack
from seeddelta.evaluation.result_cache import ResultCache, code_fingerprint
from seeddelta.evaluation.windows import text_windows
from seeddelta.evaluation.workers import Pool
from seeddelta.gguf_format.imatrix_file import write_imatrix
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import KINDS
from seeddelta.layers import parse_layers
from seeddelta.outputs import write_text_atomic
from seeddelta.regress import STEPS
from seeddelta.regress import units as U
from seeddelta.regress.baseline import b1
from seeddelta.regress.criteria import CTXS, b5_criteria
from seeddelta.regress.measure import Evaluator, Spec, run_specs
from seeddelta.regress.presets import Preset, judge, load_preset, no_saving_preset_meets_ppl, shipped_presets

CALIBRATION_SAMPLES = 400  # as the demo: ≈ 25k tokens drawn from the tiny model's training distribution
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RegressSettings:
    model: Path
    text: Path
    out: Path
    calibration: Path | None = None  # None: the tiny model's training distribution (tiny only)
    pack: Path | None = None  # None: the tiny test pack for the tiny model, no greedy pack otherwise
    chunks: int = -1  # windows per context for B1 and the presets (-1: all)
    unit_chunks: int = 8  # windows at ctx 512 for B2–B4 and the equal-bytes comparison
    layers: str | None = None  # B2–B4 layers (default all)
    densities: tuple[Fraction, ...] = (Fraction(1, 6), Fraction(1, 3))
    greedy_limit: int = 0  # prompts per task for B1 and the presets (0: all)
    stack_greedy_limit: int = 20  # prompts per task at every B4 step
    eq_densities: tuple[Fraction, ...] = eb.DENSITIES  # equal bytes: SeedΔ and pruning densities
    quant_types: tuple[str, ...] | None = None  # equal bytes: llama.cpp file types (None: the default set)
    variants: tuple[str, ...] | None = None  # equal bytes: SeedΔ variant points (None: all VARIANT_POINTS)
    steps: tuple[str, ...] = STEPS
    presets: tuple[Path, ...] | None = None  # None: the shipped presets made for this model
    jobs: int = 1  # local worker processes (evaluation.workers)
    scheduler: str | None = None  # a Dask scheduler's address: measurements run on its workers instead
    threads: int = 0  # torch threads per process (0: automatic; cores / jobs per worker when jobs > 1)
    use_cache: bool = True

    def public(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "unit_chunks": self.unit_chunks, "layers": self.layers,
                "densities": [str(d) for d in self.densities], "greedy_limit": self.greedy_limit,
                "stack_greedy_limit": self.stack_greedy_limit, "steps": list(self.steps),
                "eq_densities": [str(d) for d in self.eq_densities],
                "quant_types": None if self.quant_types is None else list(self.quant_types),
                "variants": None if self.variants is None else list(self.variants)}


@dataclass
class Context:
    settings: RegressSettings
    ev: Evaluator
    cache: ResultCache
    note: Progress
    model_sha256: str
    dims: dict[str, int]
    n_layer: int
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def pool(self) -> Pool:
        return Pool(jobs=self.settings.jobs, scheduler=self.settings.scheduler, threads=self.settings.threads)

    def run(self, specs: list[Spec], step: str) -> list[dict[str, Any]]:
        return run_specs(self.ev, specs, self.cache, step, pool=self.pool, progress=self.note, label=_label)


def _label(spec: Spec, r: Any) -> str:
    row = r.get("ctx512") or next((v for k, v in r.items() if k.startswith("ctx")), None)
    text = spec.name
    if row is not None:
        text += f": ΔNLL {row['delta_nll']:+.5f}, KLD {row['kld_mean']:.5f}"
    if r.get("greedy"):
        text += f", greedy {r['greedy']['verdict']}"
    return text


def calibration_text(settings: RegressSettings, out: Path) -> Path | None:
    """The imatrix's text: --calibration, or for the tiny model samples of its training distribution
    (never the evaluation text: calibrating on it would leak into the scores)."""
    if settings.calibration is not None:
        return settings.calibration
    if settings.model.resolve() != TINY_MODEL.resolve():
        return None
    from seeddelta.tiny.dataset import DEFAULT_SEED, heldout_texts, train_samples

    path = out / "calibration.txt"
    stream = train_samples(DEFAULT_SEED + 1, 0, heldout_texts())
    write_text_atomic(path, "".join(next(stream).text for _ in range(CALIBRATION_SAMPLES)))
    return path


def make_imatrix(ctx_: Context, calibration: Path | None, out: Path) -> Path | None:
    if calibration is None:
        return None
    path = out / "imatrix.gguf"
    if not path.is_file():
        w = text_windows(calibration, 512, -1, ctx_.ev.base.tokenizer).windows
        sums, counts = collect_imatrix(ctx_.ev.base.model, w)
        write_imatrix(path, sums, counts, [str(calibration)], w.n_chunk, w.n_ctx)
    return path


def make_xtx(ctx_: Context, calibration: Path | None, out: Path) -> Path | None:
    """XᵀX of the calibration text (the variant points' GPTQ base and refit), once per output directory."""
    if calibration is None:
        return None
    path = out / "xtx.gguf"
    if not path.is_file():
        from seeddelta.evaluation.activations import collect_xtx
        from seeddelta.gguf_format.xtx_file import write_xtx

        ctx_.note("[equal bytes] collecting XᵀX of the calibration text")
        w = text_windows(calibration, 512, -1, ctx_.ev.base.tokenizer).windows
        sums, counts = collect_xtx(ctx_.ev.base.model, w)
        write_xtx(path, sums, counts, [str(calibration)], w.n_chunk, w.n_ctx)
    return path


def pack_items(settings: RegressSettings) -> list[PackItem]:
    if settings.pack is not None:
        return load_pack(settings.pack)
    if settings.model.resolve() == TINY_MODEL.resolve():
        return load_pack(tiny_test_pack())
    return []


# ---------------------------------------------------------------------------------- presets (and B5)
def model_presets(c: Context) -> tuple[list[Preset], list[str]]:
    paths = c.settings.presets if c.settings.presets is not None else tuple(shipped_presets())
    chosen, skipped = [], []
    for p in paths:
        preset = load_preset(p)
        if preset.model_sha256 and preset.model_sha256 != c.model_sha256:
            skipped.append(f"{preset.name}: made for model {preset.model_sha256[:12]}…, not this one")
        else:
            chosen.append(preset)
    return chosen, skipped


def run_presets(c: Context, presets: Sequence[Preset], base: dict[str, Any], step: str) -> list[dict[str, Any]]:
    s = c.settings
    evals = tuple((ctx, s.chunks) for ctx in CTXS if str(ctx) in base["ppl"])
    specs = [Spec(f"preset-{p.name}", dict(p.encoding), policy=p.policy_text, evals=evals,
                  greedy_limit=s.greedy_limit if c.ev.pack else None, memory=True) for p in presets]
    results = c.run(specs, step)
    fig_settings = {"chunks": s.chunks, "greedy_limit": s.greedy_limit}
    return [judge(p, r, base, fig_settings) for p, r in zip(presets, results, strict=True)]


def b5_autogate(c: Context, base: dict[str, Any], layers: Sequence[int]) -> list[dict[str, Any]]:
    """`seeddelta scan` then `seeddelta autogate` with its defaults, through the command line (their
    own unit cache under <out>/cache/units), then the policy it wrote judged like a preset."""
    import contextlib
    import io

    from seeddelta.cli import main
    from seeddelta.layers import format_layers

    s, ev = c.settings, c.ev
    work = s.out / "b5"
    work.mkdir(parents=True, exist_ok=True)
    k_gate = U.encoding(U.Config(max(s.densities), True), c.dims)["K_gate"]
    common = ["-m", str(s.model), "-f", str(s.text), "-c", "512", "--chunks", str(s.unit_chunks),
              "--cache", str(s.out / "cache" / "units"), "-t", str(s.threads)]
    where = ["--scheduler", s.scheduler] if s.scheduler else ["-j", str(s.jobs)]
    scan = ["scan", *common, "--layers", format_layers(list(layers)), "--kinds", "gate", "--K-gate", str(k_gate),
            "--base", "--row-scale", "--eval-cols", "4096", "--eval-x", "32", "--json", str(work / "scan.json"), *where]
    if ev.imatrix is not None:
        scan += ["--imatrix", str(ev.imatrix)]
    gate = ["autogate", "--scan", str(work / "scan.json"), *common[:2], "-o", str(work / "policy.json"),
            "--cache", str(s.out / "cache" / "units"), "-t", str(s.threads)]
    gate += ["--pack", str(s.pack)] if s.pack else ([] if ev.pack else ["--no-greedy"])
    for argv in (scan, gate):
        c.note(f"[B5] seeddelta {argv[0]} (the original autogate's defaults)")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            status = main(argv)
        if status != 0:
            raise SeedDeltaError(f"B5: seeddelta {argv[0]} failed ({status}): {err.getvalue().strip()[-300:]}")
    text = (work / "policy.json").read_text(encoding="utf-8")
    preset = Preset(name="autogate-defaults", path=work / "policy.json",
                    description="`seeddelta autogate` with its defaults (the original's filters and limits) on a "
                                f"scan of ffn_gate at K {k_gate}, XOR base, row scale, imatrix",
                    model_sha256=c.model_sha256, policy_text=text,
                    encoding={"base": True, "row_scale": True, "imatrix": ev.imatrix is not None},
                    criteria=b5_criteria(bool(ev.pack)), figures={})
    return run_presets(c, [preset], base, "B5 autogate")


# ---------------------------------------------------------------------------------- the whole run
def run_regress(settings: RegressSettings, progress: Progress | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    note = progress or (lambda _m: None)
    bad = [x for x in settings.steps if x not in STEPS]
    if bad:
        raise SeedDeltaError(f"--steps: unknown step {bad[0]!r} (expected {', '.join(STEPS)})")
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    model = GGUFModel(settings.model, what="model")
    layers = parse_layers(settings.layers, model.n_layer)
    dims = {kind: model.weight_dims(0, kind)[0] for kind in KINDS}
    sha = sha256_file(settings.model)
    calibration = calibration_text(settings, out)
    ev = Evaluator(settings.model, settings.text, None, pack_items(settings), out / "work", settings.threads)
    ev.model_sha256 = sha  # worker processes check they read this file
    cache = ResultCache(out / "cache", {"model_sha256": sha, "text_sha256": sha256_file(settings.text),
                                        "calibration_sha256": sha256_file(calibration) if calibration else None,
                                        "pack": [p.id for p in ev.pack]}, enabled=settings.use_cache)
    c = Context(settings, ev, cache, note, sha, dims, model.n_layer)
    ev.imatrix = make_imatrix(c, calibration, out)
    if ev.imatrix is None:
        note("note: no calibration text (--calibration): SeedΔ runs without an imatrix, Wanda points are skipped")
    configs = [U.Config(d, b) for d in settings.densities for b in (True, False)]
    default = U.Config(max(settings.densities), True)
    report: dict[str, Any] = {
        "schema": "seeddelta.regress/1", "model": {"path": str(settings.model), "sha256": sha, "n_layer": model.n_layer,
                                                   "ffn_n_in": dims, "file_bytes": settings.model.stat().st_size},
        "text": str(settings.text), "calibration": str(calibration) if calibration else None,
        "settings": settings.public(), "code_fingerprint": code_fingerprint()[:16],
        "default_config": default.label, "configs": [x.label for x in configs],
    }

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        c.timing[name] = round(time.perf_counter() - t0, 1)
        return value

    def cached_b1() -> dict[str, Any]:
        key = {"chunks": settings.chunks, "greedy_limit": settings.greedy_limit}
        hit = cache.get("B1", key)
        if hit is None:
            hit = b1(ev, settings.chunks, settings.greedy_limit, settings.model, note)
            cache.put("B1", key, hit)
        else:
            note("[B1] from the cache")
        return hit

    base = timed("b1", cached_b1)  # every later step needs the original's figures
    report["b1"] = base
    if {"b2", "b3", "b4"} & set(settings.steps):
        b2 = timed("b2", lambda: U.b2(c.run, layers, configs, default, dims, settings.unit_chunks))
        report["b2"] = {"units": [_strip(u) for u in b2["units"]], "layers": [_strip(u) for u in b2["layers"]]}
        report["fragile_layers"] = U.fragile_layers(b2["layers"], b2["units"], default)
        if "b3" in settings.steps:
            report["b3"] = timed("b3", lambda: U.b3(c.run, b2["layers"], default, dims, settings.unit_chunks))
        if "b4" in settings.steps:
            limit = settings.stack_greedy_limit if ev.pack else None
            b4 = timed("b4", lambda: U.b4(c.run, layers, b2["layers"], default, dims, settings.unit_chunks, limit))
            b4["spearman"] = U.correlations(b2["units"])
            report["b4"] = b4
            report["recommended_thresholds"] = U.recommended_thresholds(b2["units"], b4["cliffs"], b4["spearman"])
    presets, skipped = model_presets(c)
    report["presets_skipped"] = skipped
    strict = [p for p in presets if "strict" in p.name]
    if "b5" in settings.steps:
        report["b5"] = timed("b5", lambda: b5_autogate(c, base, layers)
                             + (run_presets(c, strict, base, "B5 strict gating") if strict else []))
    if "presets" in settings.steps:
        others = [p for p in presets if p not in strict or "b5" not in settings.steps]
        report["presets"] = timed("presets", lambda: run_presets(c, others, base, "presets"))
    if "equal-bytes" in settings.steps:
        report["equal_bytes"] = timed("equal-bytes", lambda: equal_bytes_step(c))
    v1_path = out / "v1.json"  # the v1 experiments' results (`seeddelta v1 run --out` on this directory)
    if v1_path.is_file():
        import json

        v1 = json.loads(v1_path.read_text(encoding="utf-8"))
        if v1.get("model", {}).get("sha256") == sha:
            report["v1"] = v1
        else:
            note(f"note: {v1_path} was measured on another model; the v1 section is left out")
    judged = report.get("presets", []) + report.get("b5", [])
    failures = [f for j in judged for f in j["failures"]]
    report["verdict"] = {"result": "FAIL" if failures else "PASS", "failures": failures,
                         "presets_judged": len(judged),
                         "no_saving_preset_meets_ppl": no_saving_preset_meets_ppl(judged) if judged else None}
    c.timing["total"] = round(time.perf_counter() - t_start, 1)
    report["timing"] = {"seconds": c.timing, "cache": {"hits": cache.hits, "misses": cache.misses}}
    return report


def equal_bytes_step(c: Context) -> dict[str, Any]:
    """The equal-bytes comparison through the suite's workers and cache (evaluation.equal_bytes)."""
    s = c.settings
    w = c.ev.windows(512, s.unit_chunks)
    # the quick points first (quantization types, variants), plain SeedΔ and pruning after them
    cands = [eb.Candidate("original", "original")]
    if s.quant_types is None:
        cands += eb.llamacpp_candidates()
    else:
        cands += eb.llamacpp_candidates([t for t in s.quant_types if not t.endswith("+imatrix")],
                                        [t.removesuffix("+imatrix") for t in s.quant_types if t.endswith("+imatrix")])
    variants = eb.variant_candidates(s.variants)
    if any(v.needs_xtx for v in variants):
        c.ev.xtx = make_xtx(c, calibration_text(s, s.out), s.out)
    cands += variants + eb.seeddelta_candidates(s.eq_densities) + eb.pruning_candidates(s.eq_densities)
    cands, skipped = eb.runnable(cands, eb.Inputs(s.model, c.ev.imatrix, xtx=c.ev.xtx))
    for line in skipped:
        c.note(f"[equal bytes] {line}")
    specs = [Spec(f"eq-{i}", {}, evals=((512, s.unit_chunks),),
                  candidate={"family": x.family, "label": x.label, "settings": dict(x.settings)})
             for i, x in enumerate(cands)]
    rows = [r["row"] for r in run_specs(c.ev, specs, c.cache, "equal bytes", pool=c.pool, progress=c.note,
                                        label=lambda sp, r: f"{sp.candidate['label'] if sp.candidate else sp.name}: "
                                        f"{r['row']['bits_per_weight']:.2f} bits/weight, KLD {r['row']['kld_mean']:.5f}")]
    eb.mark_pareto(rows)
    return {"ctx": 512, "windows": w.n_chunk, "rows": [_strip(r) for r in rows], "skipped": skipped}


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its per-window values (kept in the cache, too long for the report)."""
    return {k: v for k, v in row.items() if k != "window_delta_nll"}
