"""One measurement of the regress suite: build a SeedΔ file (a set of units, or a policy), then
measure it against the original — KLD and paired ΔNLL at each requested context on the same
windows, the greedy pack, and (for presets) the file size and resident memory in a fresh process.

A measurement is described by a `Spec` (JSON-able, the key of its cached result) and run by an
`Evaluator`, which holds the original model, its logits per context (computed once) and its greedy
results. `run_specs` serves cached results, and measures the rest where a `Pool` says
(`evaluation.workers`: this process, local worker processes or a Dask cluster; each worker process
has its own Evaluator, loaded on its first spec; results are identical either way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from seeddelta.builder.options import BuildOptions, Resolver, baseline_resolver
from seeddelta.builder.pipeline import run_build
from seeddelta.evaluation import equal_bytes as eb
from seeddelta.evaluation.equal_bytes import kld_row
from seeddelta.evaluation.greedy import PackItem, run_pack, verdict
from seeddelta.evaluation.memory import Loaded, load
from seeddelta.evaluation.original_store import OriginalStore
from seeddelta.evaluation.pack import limit_per_task
from seeddelta.evaluation.result_cache import ResultCache
from seeddelta.evaluation.scoring import Logits, kl_divergence, model_logits
from seeddelta.evaluation.windows import Windows, text_windows
from seeddelta.evaluation.workers import Pool, Threaded, run_tasks, worker_threads
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.outputs import write_text_atomic
from seeddelta.resources import configure
from seeddelta.runtime.model import LlamaModel

Progress = Callable[[str], None]
# Report fields of every encoded weight kept with a measurement (the weight-space metrics B4 correlates).
METRIC_KEYS = ("cos_mean", "cos_p05", "rel_l2_mean", "cos_mean_w", "cos_p05_w", "rel_l2_mean_w", "cos_mean_x",
               "cos_p05_x", "cos_mean_x_w", "cos_p05_x_w", "rel_l2_mean_x_w", "norm_ratio_mean_x_w", "ffn_score",
               "ffn_proxy_cos_p05", "ffn_proxy_l2_p95")
# Kept with each encoded weight as well, outside B4's correlations (the v1 down triage's l2 tail metrics).
EXTRA_WEIGHT_KEYS = ("rel_l2_p95", "rel_l2_p95_x", "rel_l2_p95_x_w")
EVAL_COLS, EVAL_X = 4096, 32  # the demo's: every row of a model up to 4096 wide, 32 random inputs
GREEDY_TOLERANCE = 0.05  # the greedy pack's default accuracy tolerance (evaluation.greedy)

_LOAD_IN_FRESH_PROCESS = """
import json, sys
from seeddelta.evaluation.memory import load
print(json.dumps(load(sys.argv[1], mode=sys.argv[2]).memory()))
"""


@dataclass(frozen=True)
class Spec:
    """What to build and measure. `pairs`: exactly these (layer, kind) as SeedΔ (dense stripped);
    or `policy`: a policy's JSON text decides. `encoding`: BuildOptions fields (K_gate, K_up, K_down,
    base, row_scale, imatrix as a bool). `evals`: (ctx, chunks) pairs. `greedy_limit`: prompts per
    task (0: all; None: no greedy). `memory`: measure file size and resident memory (fresh process)."""

    name: str
    encoding: Mapping[str, Any]
    pairs: tuple[tuple[int, str], ...] | None = None
    policy: str | None = None
    evals: tuple[tuple[int, int], ...] = ((512, -1),)
    greedy_limit: int | None = None
    memory: bool = False
    candidate: Mapping[str, Any] | None = None  # an equal-bytes candidate {family, label, settings} instead

    def settings(self) -> dict[str, Any]:
        if self.candidate is not None:
            return {"candidate": {"family": self.candidate["family"], **dict(self.candidate["settings"])},
                    "evals": [list(e) for e in self.evals]}
        return {"encoding": dict(self.encoding), "pairs": [list(p) for p in self.pairs] if self.pairs is not None else None,
                "policy": self.policy, "evals": [list(e) for e in self.evals], "greedy_limit": self.greedy_limit,
                "memory": self.memory, "eval_cols": EVAL_COLS, "eval_x": EVAL_X}


def greedy_summary(res: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    v = verdict(dict(res), None if base is None else dict(base), GREEDY_TOLERANCE)
    return {"verdict": v["result"], "reasons": v["reasons"], "n": res["n"], "flagged": res["flagged"],
            "accuracy": res["accuracy"], "tasks": {t: round(d["accuracy"], 6) for t, d in sorted(res["tasks"].items())},
            "flagged_ids": [r["id"] for r in res["items"] if r["flags"]][:10]}


def fresh_process_memory(path: str | os.PathLike[str], mode: str) -> dict[str, Any]:
    """The memory report of loading `path` in a new Python process (one thread)."""
    out = subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, os.fspath(path), mode], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@dataclass
class Evaluator(Threaded):
    model: Path
    text: Path
    imatrix: Path | None
    pack: Sequence[PackItem]
    work_dir: Path | None  # None: a temporary directory of this process's own (a cluster worker)
    threads: int = 0  # 0: automatic (seeddelta.resources)
    keep_files: bool = False
    model_sha256: str | None = None  # the model's SHA-256 when known (computed for workers otherwise)
    check_model: bool = False  # a worker process: check the file is that model before loading it
    xtx: Path | None = None  # calibration XᵀX (equal-bytes variant points)
    _base: Loaded | None = None
    _windows: dict[tuple[int, int], Windows] = field(default_factory=dict)
    _logits: dict[tuple[int, int], Logits] = field(default_factory=dict)
    _greedy: dict[int, dict[str, Any]] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _original: OriginalStore | None = None

    def __getstate__(self) -> dict[str, Any]:  # what crosses to a worker process: the description, nothing loaded
        return {**self.__dict__, "_base": None, "_windows": {}, "_logits": {}, "_greedy": {}, "_tmp": None,
                "_original": None}

    def __call__(self, spec: Spec) -> dict[str, Any]:
        return self.run(spec)

    def with_threads(self, threads: int) -> Evaluator:
        return replace(self, threads=threads)

    def for_worker(self, pool: Pool) -> Evaluator:
        """The Evaluator another process runs: absolute paths, its share of the threads, the model checked
        by SHA-256; on a cluster a work directory of the worker's own."""
        from seeddelta.assets import sha256_file

        def absolute(p: Path | None) -> Path | None:
            return None if p is None else Path(os.path.abspath(p))

        return replace(self, model=Path(os.path.abspath(self.model)), text=Path(os.path.abspath(self.text)),
                       imatrix=absolute(self.imatrix), xtx=absolute(self.xtx),
                       work_dir=absolute(self.work_dir) if pool.scheduler is None else None,
                       threads=worker_threads(replace(pool, threads=self.threads)),
                       model_sha256=self.model_sha256 or sha256_file(self.model), check_model=True,
                       _base=None, _windows={}, _logits={}, _greedy={}, _tmp=None, _original=None)

    @property
    def base(self) -> Loaded:
        if self._base is None:
            if self.check_model and self.model_sha256 is not None:
                _check_model(self.model, self.model_sha256)
            configure(self.threads)
            self._base = load(self.model)
        return self._base

    def work(self) -> Path:
        if self.work_dir is not None:
            return self.work_dir
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="seeddelta-regress-")
        return Path(self._tmp.name)

    def windows(self, ctx: int, chunks: int) -> Windows:
        key = (ctx, chunks)
        if key not in self._windows:
            self._windows[key] = text_windows(self.text, ctx, chunks, self.base.tokenizer).windows
        return self._windows[key]

    def original(self) -> OriginalStore:
        """The original's results, shared through the work directory with this run's other processes."""
        if self._original is None:
            from seeddelta.assets import sha256_file

            self._original = OriginalStore(self.work_dir, self.model_sha256 or sha256_file(self.model))
        return self._original

    def base_logits(self, ctx: int, chunks: int) -> Logits:
        key = (ctx, chunks)
        if key not in self._logits:
            self._logits[key] = self.original().logits(lambda window, first: model_logits(self.base.model)(window, first))
        return self._logits[key]

    def base_greedy(self, limit: int) -> dict[str, Any]:
        if limit not in self._greedy:
            items = limit_per_task(self.pack, limit)
            self._greedy[limit] = self.original().greedy(
                [it.id for it in items], lambda: run_pack(self.base.model, self.base.tokenizer, items))
        return self._greedy[limit]

    def build(self, spec: Spec, out: Path) -> dict[str, Any]:
        enc = dict(spec.encoding)
        use_imatrix = bool(enc.pop("imatrix", False))
        opts = BuildOptions(input=str(self.model), output=str(out), strip_dense=True, eval_cols=EVAL_COLS,
                            eval_x=EVAL_X, imatrix=str(self.imatrix) if use_imatrix and self.imatrix else None,
                            progress=False, threads=self.threads, **enc)
        resolver: Resolver
        if spec.policy is not None:
            from seeddelta.policy.builder import policy_resolver
            from seeddelta.policy.load import parse_policy

            policy_path = out.with_suffix(".policy.json")
            write_text_atomic(policy_path, spec.policy)
            opts = replace(opts, policy=str(policy_path))
            resolver = policy_resolver(parse_policy(spec.policy, source=str(policy_path)), opts,
                                       GGUFModel(self.model, what="model").n_layer)
        else:
            chosen = frozenset(spec.pairs or ())
            opts = replace(opts, layers=",".join(str(x) for x in sorted({layer for layer, _ in chosen})) or None)
            baseline = baseline_resolver(opts)
            resolver = lambda layer, kind: replace(baseline(layer, kind), enabled=(layer, kind) in chosen)  # noqa: E731
        with open(os.devnull, "w") as quiet:
            result = run_build(opts, resolver, log=quiet)
        weights = [{"layer": w["layer"], "kind": w["kind"], "K": w["K"], "emit": w["emit"], "decision": w["decision"],
                    **{k: w.get(k) for k in METRIC_KEYS + EXTRA_WEIGHT_KEYS}} for w in result.report["weights"]]
        return {"file_bytes": result.output_bytes, "input_bytes": result.input_bytes,
                "bytes_saved": result.bytes_stripped - result.bytes_added,
                "emitted": sum(1 for w in weights if w["emit"]), "weights": weights}

    def run(self, spec: Spec) -> dict[str, Any]:
        t0 = time.perf_counter()
        work_dir = self.work()
        work_dir.mkdir(parents=True, exist_ok=True)
        if spec.candidate is not None:
            ctx, chunks = spec.evals[0]
            point = eb.Candidate(spec.candidate["family"], spec.candidate["label"], dict(spec.candidate["settings"]))
            row = eb.measure_candidate(point, eb.Inputs(self.model, self.imatrix, threads=self.threads, xtx=self.xtx),
                                       self.base_logits(ctx, chunks), self.windows(ctx, chunks), work_dir,
                                       self.keep_files)
            return {"name": spec.name, "row": row, "seconds": time.perf_counter() - t0}
        path = work_dir / f"{spec.name}.gguf"
        out: dict[str, Any] = {"name": spec.name, "build": self.build(spec, path)}
        try:
            cand = load(path, mode="sparse")
            for ctx, chunks in spec.evals:
                w = self.windows(ctx, chunks)
                if isinstance(cand.model, LlamaModel):
                    cand.model.reset_conditional_delta()
                out[f"ctx{ctx}"] = kld_row(kl_divergence(self.base_logits(ctx, chunks), model_logits(cand.model), w), w)
                saved = cand.model.conditional_delta() if isinstance(cand.model, LlamaModel) else None
                if saved is not None:  # delta_regime/1: what skipping Δ saved on these windows
                    out[f"ctx{ctx}"]["conditional_delta"] = saved
            if spec.greedy_limit is not None:
                res = run_pack(cand.model, cand.tokenizer, limit_per_task(self.pack, spec.greedy_limit))
                out["greedy"] = greedy_summary(res, self.base_greedy(spec.greedy_limit))
            del cand
            if spec.memory:
                out["memory"] = {"file_bytes": os.path.getsize(path),
                                 "rss_anon_load_delta_bytes": fresh_process_memory(path, "sparse")["rss_anon_load_delta_bytes"]}
        finally:
            if not self.keep_files:
                for p in (path, path.with_suffix(".policy.json")):
                    if p.exists():
                        os.unlink(p)
        out["seconds"] = time.perf_counter() - t0
        return out


def _check_model(path: Path, sha256: str) -> None:
    import socket

    from seeddelta.assets import sha256_file
    from seeddelta.errors import SeedDeltaError

    where = f"worker on {socket.gethostname()}"
    if not path.is_file():
        raise SeedDeltaError(f"{where}: model not found at {path} (workers must read the same files at the same "
                             "absolute paths)")
    if sha256_file(path) != sha256:
        raise SeedDeltaError(f"{where}: {path} is not the model being measured (SHA-256 differs)")


def run_specs(ev: Evaluator, specs: Sequence[Spec], cache: ResultCache, step: str, *, pool: Pool | None = None,
              progress: Progress | None = None, label: Callable[[Spec, Mapping[str, Any]], str] | None = None
              ) -> list[dict[str, Any]]:
    """Every spec's result, in order: from the cache, else measured where `pool` says (default: this
    process) and cached as soon as it is done."""
    pool = pool or Pool()
    note = progress or (lambda _m: None)
    results: list[dict[str, Any] | None] = [cache.get(step, s.settings()) for s in specs]
    todo = [i for i, r in enumerate(results) if r is None]
    done = len(specs) - len(todo)
    t0 = time.perf_counter()
    if done:
        note(f"[{step}] {done}/{len(specs)} from the cache")

    def finish(j: int, r: dict[str, Any]) -> None:
        nonlocal done
        i = todo[j]
        cache.put(step, specs[i].settings(), r)
        results[i] = r
        done += 1
        text = label(specs[i], r) if label is not None else specs[i].name
        note(f"[{step} {done}/{len(specs)}] {text}  {time.perf_counter() - t0:.0f}s")

    if todo:
        worker = ev if pool.in_process else ev.for_worker(pool)
        run_tasks(worker, [specs[i] for i in todo], pool, finish, local=ev.run)
    return [r for r in results if r is not None]
