"""The encode phase: one FFN weight dequantized, encoded at one K and measured on its stored arrays
(`run_trial`); gating of a trial (`gate_trial`); and, once the decide phase (builder.decide) has chosen
the final trial, its report entry and the tensors to write (`weight_result`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import numpy as np

from seeddelta.builder.options import (
    _METRIC_GROUP,
    BASELINE_THRESHOLDS,
    BuildOptions,
    TensorConfig,
    tensor_seed,
)
from seeddelta.builder.report import ffn_score, tile_fields, weight_entry
from seeddelta.builder.spill import Parked
from seeddelta.codec.encode import EncodeConfig, SeedDeltaWeight, encode
from seeddelta.codec.metrics import cost_model, evaluate_weight
from seeddelta.codec.partial import choose_dense_rows
from seeddelta.codec.regime import DeltaRegime
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.imatrix_file import Imatrix
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import KINDS, SEEDDELTA_SUFFIXES, seeddelta_tensor_name, weight_name
from seeddelta.gguf_format.writer import AddedTensor, RawTensor

if TYPE_CHECKING:
    from seeddelta.codec.sdq import SdqWeight


def _is_variant(sdw: SeedDeltaWeight) -> TypeGuard[SdqWeight]:
    """An sdq weight. The variant modules are imported only by a build that uses a variant (a plain
    build skips ~35 ms of imports): while they are not loaded, no weight can be one."""
    sdq = sys.modules.get("seeddelta.codec.sdq")
    return sdq is not None and isinstance(sdw, sdq.SdqWeight)


@dataclass
class WeightResult:
    """Outcome of one (layer, kind)."""

    layer: int
    kind: str
    entry: dict[str, Any] | None  # report entry (None: no entry, e.g. missing tensor without report)
    tensors: list[AddedTensor] = field(default_factory=list)  # arrays, or parked (builder.spill) once decided
    strip: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    added_bytes: int = 0
    stripped_bytes: int = 0
    attempt_seconds: list[float] = field(default_factory=list)  # per autotune attempt (report `timing`)


def gate_trial(cfg: TensorConfig, kind: str, metrics: dict[str, Any],
            thresholds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Gating fields of Appendix A.3 e–f for one trial; `thresholds` (min_mean, min_p05) after the
    stack guard, default the configured ones.

    With gating on, the metric is the one the policy names. The original silently replaced it by
    `ffn_score` for gate/up whenever functional metrics existed (spec-policy-eval §11 item 18);
    with gating off nothing is decided and the report shows what the original would have shown."""
    min_mean, min_p05 = thresholds if thresholds is not None else (cfg.min_mean, cfg.min_p05)
    has_x, has_w = bool(metrics.get("has_x")), bool(metrics.get("has_w"))
    if cfg.gating_enabled:
        metric = cfg.metric
    else:
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
    passed = (not cfg.gating_enabled) or (available and value >= min_mean and p05 >= min_p05)
    if not cfg.gating_enabled:
        decision = "no_gating"
    elif not available:
        decision = "metric_unavailable"
    else:
        decision = "pass_gating" if passed else "gating_fail"
    return {
        "gating_enabled": cfg.gating_enabled, "gating_metric": metric, "gating_value": value, "gating_p05": p05,
        "gating_min_mean": min_mean, "gating_min_p05": min_p05, "gating_pass": passed,
        "metric_used": metric, "decision": decision, "available": available,
    }


def _proxy_reason(opts: BuildOptions, kind: str, base: str) -> str:
    if opts.eval_x <= 0:
        return "proxy_requires_eval_x"
    if opts.scheme != "coo" or base != "none":
        return "proxy_requires_coo"
    if kind == "ffn_down":
        return "proxy_kind_not_supported"
    return ""


def _ffn_proxy(model: GGUFModel, opts: BuildOptions, layer: int, kind: str, sdw: SeedDeltaWeight,
               base: str) -> dict[str, Any]:
    """FFN proxy of spec §6.4 (logging only; never changes a decision): replace the current gate or
    up pre-activation by the stored SeedΔ weight and compare a sampled SwiGLU FFN output.

    As the original: x ~ N(0, I), SiLU, hidden/output subsets, absolute L2, percentiles over x.
    Unlike the original, the replaced pre-activation is the stored reconstruction including its
    row scale (the original ignored the row scale)."""
    reason = _proxy_reason(opts, kind, base)
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


def dense_rows_fraction(opts: BuildOptions, kind: str, cfg: TensorConfig) -> float:
    """The share of rows kept dense: a version-2 policy's `dense_rows`, else --dense-rows-down for ffn_down."""
    if cfg.dense_rows is not None:
        return cfg.dense_rows
    return opts.dense_rows_down if kind == "ffn_down" else 0.0


def delta_regime_of(opts: BuildOptions, layer: int, kind: str, cfg: TensorConfig) -> DeltaRegime | None:
    """Where Δ applies (codec.regime): a version-2 policy's `delta_regime`, else for ffn_gate the layer's
    calibrated regime (--delta-regime-gate with quantile bounds) or --delta-regime-gate."""
    if cfg.delta_regime is not None:
        return cfg.delta_regime
    if kind != "ffn_gate":
        return None
    return dict(opts.delta_regime_gate_layers).get(layer, opts.delta_regime_gate)


def encode_config(opts: BuildOptions, layer: int, kind: str, cfg: TensorConfig, K: int) -> EncodeConfig:
    """How one weight is encoded at budget K: the command line's encoding, with a version-2 policy's
    per-tensor base, row scale and norm clamp where it sets them."""
    base = cfg.base if cfg.base is not None else ("xor_circulant" if opts.base else "none")
    clamp = cfg.delta_norm_clamp if cfg.delta_norm_clamp is not None else (
        opts.delta_norm_clamp_down if kind == "ffn_down" else opts.delta_norm_clamp_gate if kind == "ffn_gate" else 0.0)
    return EncodeConfig(
        K=K, scheme=opts.scheme, block=cfg.block, idx_type=opts.idx_type, val_type=opts.val_type,
        row_scale=opts.row_scale if cfg.row_scale is None else cfg.row_scale, base=base,
        base_max_samples=opts.base_max_samples, base_perm_trials=max(1, opts.base_perm_trials),
        delta_norm_clamp=clamp, seed=tensor_seed(opts.seed, layer, kind, 0),
    )


@dataclass
class WeightFacts:
    """What the decide phase and the report need of an encoded weight besides its metrics: its sizes,
    and its tensors — arrays, or once a worker process has parked them, `Parked` references."""

    n_out: int
    n_in: int
    K: int
    n_blocks: int
    k_budget: int  # the codec's (0: not set by it)
    nbytes: int
    dense_rows: int | None  # rows kept dense (codec.partial)
    variant_base_type: str | None  # set: an sdq variant weight, with its base's type
    tensors: list[tuple[str, np.ndarray | RawTensor | Parked]]  # (output name, data), not yet in write order


def weight_facts(layer: int, kind: str, sdw: SeedDeltaWeight) -> WeightFacts:
    types = sdw.ggml_types() if _is_variant(sdw) else {}
    tensors: list[tuple[str, np.ndarray | RawTensor | Parked]] = [
        (seeddelta_tensor_name(layer, kind, s), RawTensor(a, types[s], ()) if s in types else a)
        for s, a in sdw.tensors().items()]
    return WeightFacts(
        int(sdw.n_out), int(sdw.n_in), int(sdw.K), int(sdw.n_blocks), int(getattr(sdw, "k_budget", 0) or 0),
        int(sdw.nbytes()), None if sdw.dense_rows is None else int(sdw.dense_rows.rows.shape[0]),
        sdw.base_type if _is_variant(sdw) else None, tensors)


@dataclass
class Trial:
    """One weight encoded at one K and measured on its stored arrays (not yet decided)."""

    layer: int
    kind: str
    K: int  # requested budget (a schedule value)
    sdw: SeedDeltaWeight | None  # None once detached (`detach_trial`): `facts` then holds all that is needed
    metrics: dict[str, Any]
    cost: dict[str, Any]
    seconds: float
    warnings: list[str]
    encoding: EncodeConfig
    facts: WeightFacts
    proxy: dict[str, Any] | None = None  # the FFN proxy's report fields, once computed


def detach_trial(model: GGUFModel, opts: BuildOptions, trial: Trial,
                 store: Callable[[str, np.ndarray | RawTensor], Parked]) -> Trial:
    """`trial` without its arrays, for a worker process to return: its tensors stored (`store`, the
    spill file) and the FFN proxy — the one other reader of the arrays — computed now."""
    assert trial.sdw is not None
    trial.proxy = _ffn_proxy(model, opts, trial.layer, trial.kind, trial.sdw, trial.encoding.base)
    trial.facts.tensors = [(name, store(name, a) if not isinstance(a, Parked) else a)
                           for name, a in trial.facts.tensors]
    trial.sdw = None
    return trial


def run_trial(model: GGUFModel, opts: BuildOptions, layer: int, kind: str, cfg: TensorConfig, K: int,
              imatrix: Imatrix | None) -> Trial:
    """Encode one weight at budget K and measure it (a deterministic function of its arguments:
    the seed depends on --seed, the layer and the kind, never on K or the order of work)."""
    t0 = time.perf_counter()
    name = weight_name(layer, kind)
    W = model.dense(name)
    n_in = W.shape[1]
    scale = imatrix.scale(name, n_in, opts.imatrix_eps, opts.imatrix_power) if imatrix is not None else None
    config = encode_config(opts, layer, kind, cfg, K)
    spec = cfg.variant if cfg.variant is not None else opts.variant_spec()
    if spec.is_variant and delta_regime_of(opts, layer, kind, cfg) is not None:
        raise SeedDeltaError(f"{name}: a delta regime (delta_regime/1) applies to plain SeedΔ, not to variant "
                             f"{spec.name}")
    try:
        if spec.is_variant:
            from seeddelta.builder.variant import encode_variant

            sdw: SeedDeltaWeight = encode_variant(opts, spec, name, W, K, config.row_scale, config.seed, scale)
        else:
            sdw = encode(W, config, scale)
    except SeedDeltaError as exc:
        raise SeedDeltaError(f"{name}: {exc}") from None
    fraction = dense_rows_fraction(opts, kind, cfg)
    if fraction > 0:  # partial strip: the rows SeedΔ fits worst stay the original's (codec.partial)
        sdw.dense_rows = choose_dense_rows(W, sdw.dense, fraction, scale)
    warnings = [f"{name}: {w}" for w in getattr(sdw, "warnings", [])]
    metrics = evaluate_weight(W, sdw, eval_cols=opts.eval_cols, eval_x=opts.eval_x, imatrix_scale=scale,
                              seed=tensor_seed(opts.seed, layer, kind, 1))
    cost = cost_model(sdw)
    if config.base != "none" and cost.get("base_B") == 1:
        warnings.append(f"{name}: base has B = 1 block; the original runtime rejects such a base (spec §12 item 2)")
    return Trial(layer, kind, K, sdw, metrics, cost, time.perf_counter() - t0, warnings, config,
                 weight_facts(layer, kind, sdw))


def attempt_record(trial: Trial, gating: dict[str, Any]) -> dict[str, Any]:
    """One `autotune_attempts` element (the original's fields; its wall-clock `seconds` live in the
    report's `timing` object instead, so that everything else stays deterministic)."""
    facts = trial.facts
    return {"K_budget": facts.k_budget, "K_eff": facts.K, "n_blocks": facts.n_blocks,
            "metric_value": gating["gating_value"], "metric_p05": gating["gating_p05"], "pass": gating["gating_pass"]}


def weight_result(model: GGUFModel, opts: BuildOptions, cfg: TensorConfig, trial: Trial, gating: dict[str, Any],
                  *, emit: bool, decision: str, attempts: list[dict[str, Any]] | None = None,
                  seconds: float | None = None, extra: dict[str, Any] | None = None) -> WeightResult:
    """The report entry and output tensors of a weight whose final trial and decision are known."""
    layer, kind, facts = trial.layer, trial.kind, trial.facts
    name = weight_name(layer, kind)
    n_out, n_in = facts.n_out, facts.n_in
    strip = emit and cfg.strip_dense
    tensors = list(facts.tensors) if emit else []
    regime = delta_regime_of(opts, layer, kind, cfg)
    regime_tensors = regime.tensors() if regime is not None else {}
    if emit:  # extension delta_regime/1: Δ only for tokens in the regime (codec.regime)
        tensors += [(seeddelta_tensor_name(layer, kind, s), a) for s, a in regime_tensors.items()]
    order = {s: i for i, s in enumerate(SEEDDELTA_SUFFIXES)}
    tensors.sort(key=lambda t: order[t[0].rsplit(".", 1)[1]])
    nbytes_sd = facts.nbytes + sum(int(a.nbytes) for a in regime_tensors.values())
    dense_bytes = model.tensor_nbytes(name)
    variant = facts.variant_base_type is not None
    # a variant may keep 0 entries (its quantized base alone)
    k_budget = facts.k_budget if variant else (facts.k_budget or min(max(1, trial.K), n_in))
    if trial.proxy is None:
        assert trial.sdw is not None  # a detached trial has its proxy computed
        trial.proxy = _ffn_proxy(model, opts, layer, kind, trial.sdw, trial.encoding.base)
    gating_fields = {k: v for k, v in gating.items() if k != "available"}
    gating_fields["decision"] = decision
    entry_values: dict[str, Any] = {
        "layer": layer, "kind": kind, "n_in": n_in, "n_out": n_out, "K_budget": k_budget, "K": facts.K,
        "block": cfg.block, "n_blocks": facts.n_blocks, **{k: v for k, v in trial.metrics.items()},
        **trial.cost, **gating_fields,
        "ffn_score": ffn_score(trial.metrics),
        **trial.proxy,
        "emit": emit, "strip_dense": strip,
        **tile_fields(n_out, facts.K),
        "autotune_selected_budget": k_budget if emit else 0,
        "dense_type": model.tensor_type(name).name, "bytes_dense": dense_bytes,
        "bytes_seeddelta": nbytes_sd, "bits_per_weight": 8.0 * nbytes_sd / (n_in * n_out),
    }
    if facts.dense_rows is not None:
        entry_values["dense_rows"] = facts.dense_rows
    if regime is not None:
        entry_values["delta_regime"] = regime.stored().to_json()  # the bounds as the file holds them (float32)
    if cfg.autotune:
        entry_values["autotune_enabled"] = True
        entry_values["autotune_attempts"] = attempts or []
    entry_values["ops_ratio"] = float(entry_values["ops_ratio"])
    if variant:
        spec = cfg.variant if cfg.variant is not None else opts.variant_spec()
        entry_values.update({"variant": spec.to_json(), "base_type": facts.variant_base_type})
    entry_values.update(extra or {})
    # a worker's `Parked` entries become the spill file's LazyTensors in decide_all before anything reads them
    result = WeightResult(layer, kind, weight_entry(**entry_values), cast(list[AddedTensor], tensors), strip,
                          trial.seconds if seconds is None else seconds, list(trial.warnings))
    result.added_bytes = sum(int(a.data.nbytes if isinstance(a, RawTensor) else a.nbytes) for _, a in tensors)
    result.stripped_bytes = dense_bytes if strip else 0
    return result


def stub_entry(opts: BuildOptions, layer: int, kind: str, cfg: TensorConfig | None, decision: str,
                n_in: int = 0, n_out: int = 0) -> dict[str, Any]:
    min_mean, min_p05 = (cfg.min_mean, cfg.min_p05) if cfg is not None else BASELINE_THRESHOLDS[kind]
    return weight_entry(
        layer=layer, kind=kind, n_in=n_in, n_out=n_out,
        gating_enabled=cfg.gating_enabled if cfg is not None else False,
        gating_metric=cfg.metric if cfg is not None else "cos_x_w",
        metric_used=cfg.metric if cfg is not None else "cos_x_w",
        gating_min_mean=min_mean, gating_min_p05=min_p05, decision=decision,
    )
