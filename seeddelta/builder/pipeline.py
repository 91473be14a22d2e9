"""The builder: a llama GGUF in, a SeedΔ GGUF (and report.json) out — `seeddelta build`.

Flow per selected weight (spec-builder-runtime Appendix A, without autotune/policy for now):
resolve the per-tensor config (`TensorConfig`; a policy plugs in as a `Resolver`), dequantize
the dense weight, take its imatrix scale, `codec.encode`, evaluate on the stored arrays,
decide (gating; `no_gating` without a policy), and collect the tensors and keys to write.

Deterministic: the seed of every tensor is derived from `--seed`, the layer and the kind
(`tensor_seed`), never from the order of work or the wall clock, so the same inputs and flags
give a byte-identical GGUF and — apart from the separate `timing` object — report.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
from gguf import GGUFValueType

from seeddelta.builder.report import (
    ffn_score,
    resid_object,
    tile_fields,
    top_level,
    weight_entry,
    write_report,
)
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.imatrix_file import Imatrix, read_imatrix
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import (
    KINDS,
    SEEDDELTA_SUFFIXES,
    seeddelta_tensor_name,
    tensor_kv_prefix,
    weight_name,
)
from seeddelta.gguf_format.writer import KV, write_model_copy
from seeddelta.layers import parse_layers
from seeddelta.outputs import same_file

# Baseline gating thresholds of the original (Appendix A.1 step 5): (min_mean, min_p05).
BASELINE_THRESHOLDS = {"ffn_gate": (0.45, 0.30), "ffn_up": (0.45, 0.30), "ffn_down": (0.25, 0.15)}
GATING_METRICS = ("cos", "cos_w", "cos_x", "cos_x_w", "ffn_score")
_METRIC_GROUP = {"cos": "", "cos_w": "_w", "cos_x": "_x", "cos_x_w": "_x_w"}


@dataclass(frozen=True)
class BuildOptions:
    """Everything `seeddelta build` takes (names follow the original's flags, §11.1)."""

    input: str
    output: str
    layers: str | None = None
    scheme: str = "coo"
    block: int = 32
    K: int = 32
    K_gate: int = -1
    K_up: int = -1
    K_down: int = -1
    idx_type: str = "i16"
    val_type: str = "f16"
    row_scale: bool = False
    imatrix: str | None = None
    imatrix_eps: float = 1e-8
    imatrix_power: float = 1.0
    base: bool = False
    base_max_samples: int = 2048
    base_perm_trials: int = 1
    strip_dense: bool = False
    policy: str | None = None
    policy_strict: bool = False
    eval_cols: int = 0
    eval_x: int = 0
    report_json: str | None = None
    seed: int = 1234
    delta_norm_clamp_down: float = 0.0
    threads: int = 0  # 0: one per CPU
    overwrite_existing: bool = False
    deterministic_report: bool = False
    progress: bool = True

    def kind_K(self, kind: str) -> int:
        """Effective CLI budget of a kind (Appendix A.1 step 4): --K-<kind> if > 0, else --K."""
        per = {"ffn_gate": self.K_gate, "ffn_up": self.K_up, "ffn_down": self.K_down}[kind]
        return per if per > 0 else max(1, self.K)


@dataclass(frozen=True)
class TensorConfig:
    """Resolved configuration of one (layer, kind): what a policy decides (Appendix A.2).

    Without a policy the baseline applies: enabled, `--strip-dense`, `--block`, the kind's K,
    metric `cos_x_w` with the baseline thresholds, gating disabled."""

    enabled: bool
    strip_dense: bool
    K: int
    block: int
    metric: str = "cos_x_w"
    gating_enabled: bool = False
    min_mean: float = 0.45
    min_p05: float = 0.30

    @property
    def require_eval_x(self) -> bool:
        return self.gating_enabled and self.metric in ("cos_x", "cos_x_w", "ffn_score")

    @property
    def require_imatrix(self) -> bool:
        return self.gating_enabled and self.metric in ("cos_w", "cos_x_w", "ffn_score")


Resolver = Callable[[int, str], TensorConfig]


def baseline_resolver(opts: BuildOptions) -> Resolver:
    def resolve(layer: int, kind: str) -> TensorConfig:
        min_mean, min_p05 = BASELINE_THRESHOLDS[kind]
        return TensorConfig(enabled=True, strip_dense=opts.strip_dense, K=opts.kind_K(kind), block=opts.block,
                            min_mean=min_mean, min_p05=min_p05)
    return resolve


def tensor_seed(seed: int, layer: int, kind: str, stream: int = 0) -> int:
    """A 32-bit seed for (layer, kind, stream) derived from --seed only."""
    ss = np.random.SeedSequence([seed % (1 << 32), layer, KINDS.index(kind), stream])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def validate_options(opts: BuildOptions, *, policy_supported: bool = False) -> None:
    if opts.scheme not in ("coo", "block"):
        raise SeedDeltaError(f"--scheme must be coo or block, got {opts.scheme!r}")
    if opts.scheme == "block" and not 1 <= opts.block <= 4096:
        raise SeedDeltaError(f"--block must be in 1..4096 for scheme block, got {opts.block}")
    if opts.block <= 0:
        raise SeedDeltaError(f"--block must be positive, got {opts.block}")
    if opts.K <= 0:
        raise SeedDeltaError(f"--K must be a positive integer, got {opts.K}")
    for flag, value in (("--K-gate", opts.K_gate), ("--K-up", opts.K_up), ("--K-down", opts.K_down)):
        if value <= 0 and value != -1:
            raise SeedDeltaError(f"{flag} must be a positive integer (or -1 for --K), got {value}")
    if opts.idx_type not in ("i16", "i32"):
        raise SeedDeltaError(f"--idx-type must be i16 or i32, got {opts.idx_type!r}")
    if opts.val_type not in ("f16", "f32"):
        raise SeedDeltaError(f"--val-type must be f16 or f32, got {opts.val_type!r}")
    if opts.eval_cols < 0 or opts.eval_x < 0:
        raise SeedDeltaError("--eval-cols and --eval-x must be >= 0")
    for flag, fvalue in (("--imatrix-eps", opts.imatrix_eps), ("--imatrix-power", opts.imatrix_power),
                         ("--delta-norm-clamp-down", opts.delta_norm_clamp_down)):
        if not np.isfinite(fvalue):
            raise SeedDeltaError(f"{flag} must be a finite number, got {fvalue}")
    if opts.delta_norm_clamp_down < 0:
        raise SeedDeltaError(f"--delta-norm-clamp-down must be >= 0, got {opts.delta_norm_clamp_down}")
    if opts.threads < 0:
        raise SeedDeltaError(f"-t must be >= 1 (or 0 for one per CPU), got {opts.threads}")
    if not opts.output:
        raise SeedDeltaError("-o/--output is required")
    if same_file(opts.input, opts.output):
        raise SeedDeltaError(f"-o {opts.output} is the input file; the input is never overwritten, choose another -o")
    out_dir = os.path.dirname(os.path.abspath(opts.output))
    if not os.path.isdir(out_dir):
        raise SeedDeltaError(f"output directory does not exist: {out_dir}")
    if not os.access(out_dir, os.W_OK):
        raise SeedDeltaError(f"output directory is not writable: {out_dir}")
    if opts.report_json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(opts.report_json))):
        raise SeedDeltaError(f"report directory does not exist: {os.path.dirname(os.path.abspath(opts.report_json))}")
    if opts.policy is not None and not policy_supported:
        raise SeedDeltaError(
            "policy support is not implemented yet (the policy issue; spec-policy-eval.md) — run without --policy"
        )
    if opts.policy is not None and opts.eval_cols <= 0:
        raise SeedDeltaError("--policy requires --eval-cols > 0")


@dataclass
class WeightResult:
    """Outcome of one (layer, kind)."""

    layer: int
    kind: str
    entry: dict[str, Any] | None  # report entry (None: no entry, e.g. missing tensor without report)
    tensors: list[tuple[str, np.ndarray]] = field(default_factory=list)
    strip: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    added_bytes: int = 0
    stripped_bytes: int = 0


@dataclass
class BuildResult:
    report: dict[str, Any]
    results: list[WeightResult]
    output_bytes: int
    input_bytes: int
    bytes_added: int
    bytes_stripped: int
    bytes_replaced: int
    seconds: float


class _Progress:
    def __init__(self, total: int, stream: TextIO | None) -> None:
        self.total, self.stream, self.done, self.t0 = total, stream, 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.stream is not None:
            print(f"[{self.done}/{self.total}] {label}  {time.perf_counter() - self.t0:.1f}s", file=self.stream, flush=True)


def _gating(cfg: TensorConfig, kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Gating fields of Appendix A.3 e–f for one trial."""
    has_x, has_w = bool(metrics.get("has_x")), bool(metrics.get("has_w"))
    metric = "ffn_score" if kind in ("ffn_gate", "ffn_up") and has_x else cfg.metric
    if metric == "ffn_score":
        value = p05 = ffn_score(metrics)
    else:
        group = _METRIC_GROUP[metric]
        value, p05 = float(metrics[f"cos_mean{group}"]), float(metrics[f"cos_p05{group}"])
    available = True
    if cfg.gating_enabled:
        needs_x = metric in ("cos_x", "cos_x_w", "ffn_score")
        needs_w = metric in ("cos_w", "cos_x_w")
        available = (not needs_x or has_x) and (not needs_w or has_w)
    passed = (not cfg.gating_enabled) or (available and value >= cfg.min_mean and p05 >= cfg.min_p05)
    if not cfg.gating_enabled:
        decision = "no_gating"
    elif not available:
        decision = "metric_unavailable"
    else:
        decision = "pass_gating" if passed else "gating_fail"
    return {
        "gating_enabled": cfg.gating_enabled, "gating_metric": metric, "gating_value": value, "gating_p05": p05,
        "gating_min_mean": cfg.min_mean, "gating_min_p05": cfg.min_p05, "gating_pass": passed,
        "metric_used": metric, "decision": decision,
    }


def _proxy_reason(opts: BuildOptions, kind: str) -> str:
    if opts.eval_x <= 0:
        return "proxy_requires_eval_x"
    if opts.scheme != "coo" or opts.base:
        return "proxy_requires_coo"
    if kind == "ffn_down":
        return "proxy_kind_not_supported"
    return ""


def _ffn_proxy(model: GGUFModel, opts: BuildOptions, layer: int, kind: str, sdw: Any) -> dict[str, Any]:
    """FFN proxy of spec §6.4 (logging only; never changes a decision): replace the current gate or
    up pre-activation by the stored SeedΔ weight and compare a sampled SwiGLU FFN output.

    As the original: x ~ N(0, I), SiLU, hidden/output subsets, absolute L2, percentiles over x.
    Unlike the original, the replaced pre-activation is the stored reconstruction including its
    row scale (the original ignored the row scale)."""
    reason = _proxy_reason(opts, kind)
    if reason:
        return {"ffn_proxy_available": False, "ffn_proxy_reason": reason}
    names = {k: weight_name(layer, k) for k in KINDS}
    if not all(model.has(n) for n in names.values()):
        return {"ffn_proxy_available": False, "ffn_proxy_reason": "proxy_unavailable"}
    seed = opts.seed + 101 * layer + {"ffn_gate": 1, "ffn_up": 2, "ffn_down": 3}[kind]
    rng = np.random.default_rng(seed % (1 << 64))
    gate, up, down = (model.dense(names[k]) for k in KINDS)
    n_ff, n_embd = gate.shape
    sample = opts.eval_cols if opts.eval_cols > 0 else 128
    hidden = rng.permutation(n_ff)[: min(n_ff, sample)]
    outputs = rng.permutation(n_embd)[: min(n_embd, sample)]
    n_x = min(opts.eval_x, 128)
    x = rng.standard_normal((n_x, n_embd)).astype(np.float32).astype(np.float64)
    g = x @ gate[hidden].astype(np.float64).T  # (n_x, |H|)
    u = x @ up[hidden].astype(np.float64).T
    replaced = x @ sdw.dense(hidden).T
    g_hat, u_hat = (replaced, u) if kind == "ffn_gate" else (g, replaced)
    w_down = down[np.ix_(outputs, hidden)].astype(np.float64)  # (|O|, |H|)

    def silu(v: np.ndarray) -> np.ndarray:
        return v / (1.0 + np.exp(-np.clip(v, -500, 500)))

    y = (silu(g) * u) @ w_down.T
    y_hat = (silu(g_hat) * u_hat) @ w_down.T
    yy, hh = np.sum(y * y, axis=1), np.sum(y_hat * y_hat, axis=1)
    ny, nh = np.sqrt(np.maximum(yy, 1e-20)), np.sqrt(np.maximum(hh, 1e-20))
    cos = np.sum(y * y_hat, axis=1) / (ny * nh)
    l2 = np.linalg.norm(y - y_hat, axis=1)
    ratio = (nh / ny)[yy > 0]
    log_ratio = np.log(ratio[ratio > 0])

    def pct(v: np.ndarray, q: float) -> float:
        return float(np.percentile(v, q)) if v.size else 0.0

    return {
        "ffn_proxy_available": True, "ffn_proxy_reason": "", "ffn_proxy_scope": "replace_only_current_tensor",
        "ffn_proxy_base_used": False, "ffn_proxy_eval_x": n_x, "ffn_proxy_eval_out": int(outputs.size),
        "ffn_proxy_seed": seed,
        "ffn_proxy_cos_mean": float(cos.mean()), "ffn_proxy_cos_p05": pct(cos, 5),
        "ffn_proxy_l2_mean": float(l2.mean()), "ffn_proxy_l2_p95": pct(l2, 95),
        "ffn_proxy_log_norm_ratio_mean": float(log_ratio.mean()) if log_ratio.size else 0.0,
        "ffn_proxy_log_norm_ratio_p95": pct(log_ratio, 95),
    }


def _encode_one(
    model: GGUFModel, opts: BuildOptions, layer: int, kind: str, cfg: TensorConfig, imatrix: Imatrix | None,
) -> WeightResult:
    from seeddelta.codec.encode import EncodeConfig, encode
    from seeddelta.codec.metrics import cost_model, evaluate_weight

    t0 = time.perf_counter()
    name = weight_name(layer, kind)
    W = model.dense(name)
    n_out, n_in = W.shape
    scale = imatrix.scale(name, n_in, opts.imatrix_eps, opts.imatrix_power) if imatrix is not None else None
    config = EncodeConfig(
        K=cfg.K, scheme=opts.scheme, block=cfg.block, idx_type=opts.idx_type, val_type=opts.val_type,
        row_scale=opts.row_scale, base="xor_circulant" if opts.base else "none",
        base_max_samples=opts.base_max_samples, base_perm_trials=max(1, opts.base_perm_trials),
        delta_norm_clamp=opts.delta_norm_clamp_down if kind == "ffn_down" else 0.0,
        seed=tensor_seed(opts.seed, layer, kind, 0),
    )
    try:
        sdw = encode(W, config, scale)
    except SeedDeltaError as exc:
        raise SeedDeltaError(f"{name}: {exc}") from None
    warnings = [f"{name}: {w}" for w in getattr(sdw, "warnings", [])]
    metrics = evaluate_weight(W, sdw, eval_cols=opts.eval_cols, eval_x=opts.eval_x, imatrix_scale=scale,
                              seed=tensor_seed(opts.seed, layer, kind, 1))
    cost = cost_model(sdw)
    if opts.base and cost.get("base_B") == 1:
        warnings.append(f"{name}: base has B = 1 block; the original runtime rejects such a base (spec §12 item 2)")
    gating = _gating(cfg, kind, metrics)
    emit = cfg.enabled and gating["gating_pass"]
    strip = emit and cfg.strip_dense
    tensors = [(seeddelta_tensor_name(layer, kind, s), a) for s, a in sdw.tensors().items()] if emit else []
    order = {s: i for i, s in enumerate(SEEDDELTA_SUFFIXES)}
    tensors.sort(key=lambda t: order[t[0].rsplit(".", 1)[1]])
    nbytes_sd = int(sdw.nbytes())
    dense_bytes = model.tensor_nbytes(name)
    k_budget = int(getattr(sdw, "k_budget", 0) or min(max(1, cfg.K), n_in))
    entry_values: dict[str, Any] = {
        "layer": layer, "kind": kind, "n_in": n_in, "n_out": n_out, "K_budget": k_budget, "K": int(sdw.K),
        "block": cfg.block, "n_blocks": int(sdw.n_blocks), **{k: v for k, v in metrics.items()},
        **cost, **gating,
        "ffn_score": ffn_score(metrics),
        **_ffn_proxy(model, opts, layer, kind, sdw),
        "emit": emit, "strip_dense": strip,
        **tile_fields(n_out, int(sdw.K)),
        "autotune_selected_budget": k_budget if emit else 0,
        "dense_type": model.tensor_type(name).name, "bytes_dense": dense_bytes,
        "bytes_seeddelta": nbytes_sd, "bits_per_weight": 8.0 * nbytes_sd / (n_in * n_out),
    }
    entry_values["ops_ratio"] = float(entry_values["ops_ratio"])
    result = WeightResult(layer, kind, weight_entry(**entry_values), tensors, strip,
                          time.perf_counter() - t0, warnings)
    result.added_bytes = sum(int(a.nbytes) for _, a in tensors)
    result.stripped_bytes = dense_bytes if strip else 0
    return result


def _stub_entry(opts: BuildOptions, layer: int, kind: str, cfg: TensorConfig | None, decision: str,
                n_in: int = 0, n_out: int = 0) -> dict[str, Any]:
    min_mean, min_p05 = (cfg.min_mean, cfg.min_p05) if cfg is not None else BASELINE_THRESHOLDS[kind]
    return weight_entry(
        layer=layer, kind=kind, n_in=n_in, n_out=n_out,
        gating_enabled=cfg.gating_enabled if cfg is not None else False,
        gating_metric=cfg.metric if cfg is not None else "cos_x_w",
        metric_used=cfg.metric if cfg is not None else "cos_x_w",
        gating_min_mean=min_mean, gating_min_p05=min_p05, decision=decision,
    )


def _global_keys(opts: BuildOptions, any_seeddelta: bool, any_strip: bool) -> list[KV]:
    u32, b = GGUFValueType.UINT32, GGUFValueType.BOOL
    k_default = max(1, opts.K)
    ks = {kind: opts.kind_K(kind) for kind in KINDS}
    variable = any(v != k_default for v in ks.values())
    keys = [
        KV("seeddelta.enabled", any_seeddelta, b),
        KV("seeddelta.version", 1, u32),
        KV("seeddelta.scheme", 0 if opts.scheme == "coo" else 1, u32),
        KV("seeddelta.row_scale", opts.row_scale, b),
        KV("seeddelta.resid.K", k_default, u32),
        KV("seeddelta.strip_dense", any_strip, b),
    ]
    if opts.scheme == "block":
        keys.append(KV("seeddelta.resid.block", opts.block, u32))
    keys.append(KV("seeddelta.resid.K_variable", variable, b))
    if variable:
        keys += [KV("seeddelta.resid.K_gate", ks["ffn_gate"], u32), KV("seeddelta.resid.K_up", ks["ffn_up"], u32),
                 KV("seeddelta.resid.K_down", ks["ffn_down"], u32)]
    keys.append(KV("seeddelta.base.enabled", opts.base, b))
    if opts.base:
        keys += [
            KV("seeddelta.base.kind", 1, u32), KV("seeddelta.base.depth", 2, u32), KV("seeddelta.base.R", 1, u32),
            KV("seeddelta.base.max_samples", max(0, opts.base_max_samples), u32),
            KV("seeddelta.base.perm_trials", max(1, opts.base_perm_trials), u32),
        ]
    return keys


def _tensor_keys(entry: dict[str, Any]) -> list[KV]:
    prefix = tensor_kv_prefix(entry["layer"], entry["kind"])
    b = GGUFValueType.BOOL
    return [
        KV(f"{prefix}.enabled", bool(entry["emit"]), b),
        KV(f"{prefix}.gating_pass", bool(entry["gating_pass"]), b),
        KV(f"{prefix}.strip_dense", bool(entry["strip_dense"]), b),
        KV(f"{prefix}.K", max(0, int(entry["K"])), GGUFValueType.UINT32),
    ]


def run_build(opts: BuildOptions, resolver: Resolver | None = None, *, log: TextIO | None = None) -> BuildResult:
    """Build the SeedΔ GGUF (and report) described by `opts`. Raises SeedDeltaError on bad input."""
    t_start = time.perf_counter()
    log = log if log is not None else sys.stderr
    validate_options(opts, policy_supported=resolver is not None)
    policy_bytes = None
    if opts.policy is not None:
        try:
            with open(opts.policy, "rb") as fh:
                policy_bytes = fh.read()
        except OSError as exc:
            raise SeedDeltaError(f"cannot read policy {opts.policy}: {exc.strerror or exc}") from None
    model = GGUFModel(opts.input)
    input_bytes = model.file_size
    layers = parse_layers(opts.layers, model.n_layer)
    resolve = resolver or baseline_resolver(opts)
    existing = model.seeddelta_weights()
    if existing and not opts.overwrite_existing:
        first = existing[0]
        raise SeedDeltaError(
            f"input already holds SeedΔ tensors for {len(existing)} weight(s) (e.g. blk.{first[0]}.{first[1]}); "
            "pass --overwrite-existing to re-encode them"
        )
    imatrix = read_imatrix(opts.imatrix) if opts.imatrix else None

    # plan: which weights are encoded, recorded, or kept as they are
    tasks: list[tuple[int, str, TensorConfig]] = []
    plan: list[tuple[int, str, str, TensorConfig | None]] = []  # (layer, kind, action, cfg)
    keep_existing: set[tuple[int, str]] = set()
    for layer in layers:
        for kind in KINDS:
            name = weight_name(layer, kind)
            cfg = resolve(layer, kind)
            if cfg.require_eval_x and (opts.eval_x <= 0 or opts.eval_cols <= 0):
                raise SeedDeltaError(f"{name}: gating metric {cfg.metric} needs --eval-cols > 0 and --eval-x > 0")
            if cfg.require_imatrix and imatrix is None:
                raise SeedDeltaError(f"{name}: gating metric {cfg.metric} needs --imatrix")
            if not model.has(name):
                if (layer, kind) in existing:
                    keep_existing.add((layer, kind))
                    plan.append((layer, kind, "keep", cfg))
                else:
                    plan.append((layer, kind, "missing", cfg))
                continue
            if len(model.tensors[name].shape) != 2:
                continue  # not a matrix: skipped silently, as the original
            if not cfg.enabled:
                plan.append((layer, kind, "disabled", cfg))
                continue
            if cfg.K <= 0:
                raise SeedDeltaError(f"{name}: K must be a positive integer, got {cfg.K}")
            if imatrix is not None:
                n_in = int(model.tensors[name].shape[0])
                imatrix.entry(name, n_in)  # fail before any work if the imatrix does not match
            plan.append((layer, kind, "encode", cfg))
            tasks.append((layer, kind, cfg))

    for layer, kind in sorted(keep_existing):
        print(f"warning: blk.{layer}.{kind}: dense weight is absent (stripped); its existing SeedΔ tensors are "
              "kept unchanged", file=log)

    progress = _Progress(len(tasks), log if opts.progress else None)
    threads = opts.threads or (os.cpu_count() or 1)

    def work(task: tuple[int, str, TensorConfig]) -> WeightResult:
        layer, kind, cfg = task
        result = _encode_one(model, opts, layer, kind, cfg, imatrix)
        progress.step(f"blk.{layer}.{kind}")
        return result

    encoded: dict[tuple[int, str], WeightResult] = {}
    if threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            res = work(task)
            encoded[(res.layer, res.kind)] = res
    else:
        pool = ThreadPoolExecutor(max_workers=min(threads, len(tasks)))
        try:
            futures = [pool.submit(work, task) for task in tasks]
            for future in futures:  # in build order; the first error stops the build
                res = future.result()
                encoded[(res.layer, res.kind)] = res
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # assemble in build order: report entries, keys, tensors
    results: list[WeightResult] = []
    running_cost, pass_gate_up, pass_down = 0.0, 0, 0
    for layer, kind, action, plan_cfg in plan:
        if action == "encode":
            res = encoded[(layer, kind)]
            entry = res.entry
            assert entry is not None
            emit = bool(entry["emit"])
            delta = 0.0
            if emit and np.isfinite(entry["gating_value"]) and np.isfinite(entry["gating_p05"]):
                delta = max(0.0, entry["gating_min_mean"] - entry["gating_value"]) + \
                    max(0.0, entry["gating_min_p05"] - entry["gating_p05"])
            total = running_cost + (delta if emit else 0.0)
            if emit:
                running_cost = total
                if kind == "ffn_down":
                    pass_down += 1
                else:
                    pass_gate_up += 1
            entry["stack_cost_delta"], entry["stack_cost_total"] = delta, total
            for w in res.warnings:
                print(f"warning: {w}", file=log)
            results.append(res)
        elif action == "missing":
            if opts.report_json is not None or opts.policy is not None:
                results.append(WeightResult(layer, kind, _stub_entry(opts, layer, kind, plan_cfg, "missing_tensor")))
        elif action == "disabled":
            n_in, n_out = model.weight_dims(layer, kind)
            results.append(WeightResult(layer, kind, _stub_entry(opts, layer, kind, plan_cfg, "disabled", n_in, n_out)))

    processed = {(r.layer, r.kind) for r in results}
    drop_tensors: set[str] = set()
    bytes_replaced = 0
    for layer, kind in existing:
        if (layer, kind) in processed and (layer, kind) not in keep_existing:
            for suffix in SEEDDELTA_SUFFIXES:
                name = seeddelta_tensor_name(layer, kind, suffix)
                if model.has(name):
                    drop_tensors.add(name)
                    bytes_replaced += model.tensor_nbytes(name)
    bytes_stripped = 0
    for res in results:
        if res.strip:
            drop_tensors.add(weight_name(res.layer, res.kind))
            bytes_stripped += res.stripped_bytes
    add_tensors = [t for res in results for t in res.tensors]
    bytes_added = sum(int(a.nbytes) for _, a in add_tensors)

    remaining = [lk for lk in existing if lk not in processed or lk in keep_existing]
    any_strip = any(r.strip for r in results) or any(not model.has(weight_name(*lk)) for lk in remaining)
    any_seeddelta = bool(add_tensors) or bool(remaining)
    if opts.strip_dense and not any(r.strip for r in results):
        print("warning: --strip-dense was given but no dense weight was stripped", file=log)

    drop_keys = {k for k in model.kv_keys() if k.startswith("seeddelta.") and not k.startswith("seeddelta.blk.")}
    for layer, kind in processed:
        prefix = tensor_kv_prefix(layer, kind) + "."
        drop_keys.update(k for k in model.kv_keys() if k.startswith(prefix))
    set_keys = _global_keys(opts, any_seeddelta, any_strip)
    for res in results:
        assert res.entry is not None
        set_keys += _tensor_keys(res.entry)

    write_model_copy(model, opts.output, drop_tensors=drop_tensors, add_tensors=add_tensors,
                     drop_keys=drop_keys, set_keys=set_keys)
    output_bytes = os.path.getsize(opts.output)
    seconds = time.perf_counter() - t_start

    resid = resid_object(
        scheme=opts.scheme, block=opts.block, K=max(1, opts.K), K_gate=opts.kind_K("ffn_gate"),
        K_up=opts.kind_K("ffn_up"), K_down=opts.kind_K("ffn_down"), idx_type=opts.idx_type,
        val_type=opts.val_type, row_scale=opts.row_scale,
    )
    timing = None if opts.deterministic_report else {
        "total_seconds": seconds,
        "weights": [{"layer": r.layer, "kind": r.kind, "seconds": r.seconds} for r in results if r.seconds > 0],
    }
    report = top_level(
        input_path=opts.input, output_path=opts.output, base=opts.base, policy_file=opts.policy or "",
        policy_bytes=policy_bytes, base_max_samples=opts.base_max_samples, base_perm_trials=max(1, opts.base_perm_trials),
        imatrix_file=opts.imatrix, imatrix_eps=opts.imatrix_eps, imatrix_power=opts.imatrix_power,
        imatrix_datasets=imatrix.datasets if imatrix is not None else [], resid=resid,
        eval_cols=opts.eval_cols, eval_x=opts.eval_x, stack_pass_gate_up=pass_gate_up, stack_pass_down=pass_down,
        weights=[r.entry for r in results if r.entry is not None], input_bytes=input_bytes,
        output_bytes=output_bytes, bytes_added=bytes_added, bytes_stripped=bytes_stripped,
        bytes_replaced=bytes_replaced, timing=timing,
    )
    if opts.report_json:
        write_report(opts.report_json, report)
    return BuildResult(report, results, output_bytes, input_bytes, bytes_added, bytes_stripped, bytes_replaced,
                       seconds)


def size_warnings(result: BuildResult) -> list[str]:
    """What a user compressing for size must hear: stripped weights whose SeedΔ tensors take more
    bytes than the dense (possibly quantized) weights they replace, or SeedΔ added with nothing stripped."""
    encoded = [r for r in result.results if r.entry is not None and r.entry.get("emit")]
    stripped = [r for r in encoded if r.strip]
    out = []
    grew = [r for r in stripped if r.added_bytes > r.stripped_bytes]
    if grew:
        added = sum(r.added_bytes for r in grew)
        dense = sum(r.stripped_bytes for r in grew)
        out.append(f"{len(grew)} of {len(stripped)} stripped weight(s) take more bytes as SeedΔ ({added} B) than "
                   f"as the dense weights they replace ({dense} B, {added / dense:.2f}x): lower K to save space")
    if encoded and not stripped:
        out.append("no dense weight stripped: the file holds SeedΔ on top of every dense weight "
                   "(--strip-dense replaces them)")
    return out


def summary_line(result: BuildResult, opts: BuildOptions) -> str:
    n_emit = sum(1 for r in result.results if r.entry is not None and r.entry.get("emit"))
    n_strip = sum(1 for r in result.results if r.strip)
    line = (f"wrote {opts.output}: {n_emit} weight(s) encoded, {n_strip} stripped; "
            f"+{result.bytes_added} B SeedΔ, -{result.bytes_stripped} B dense; "
            f"{result.input_bytes} -> {result.output_bytes} B in {result.seconds:.1f}s")
    if opts.report_json:
        line += f"; report {opts.report_json}"
    return line


__all__: Sequence[str] = [
    "BuildOptions", "BuildResult", "Resolver", "TensorConfig", "WeightResult", "baseline_resolver",
    "run_build", "size_warnings", "summary_line", "tensor_seed", "validate_options",
]
