"""`report.json` of `seeddelta build` (spec-builder-runtime §10), always valid JSON.

Field names, order and meanings follow the original. Differences, all deliberate:

* numbers are written with full precision by `json.dumps(allow_nan=False)`; a non-finite value
  (never produced by our metrics) would be written as `null`, never as `nan`/`inf`;
* metrics describe the stored (fp16-rounded) tensors, not float32 intermediates;
* our additions: per weight `bytes_dense` (the dense weight in its stored type), `bytes_seeddelta`
  (all SeedΔ tensors of the weight), `bits_per_weight` (bytes_seeddelta·8 / (n_in·n_out)),
  `dense_type`; top level `input_bytes`, `output_bytes`, `bytes_added` (SeedΔ tensors written),
  `bytes_stripped` (dense weights dropped), `bytes_replaced` (old SeedΔ tensors dropped by
  `--overwrite-existing`), `seeddelta_py_version`, and — apart from everything else — `timing` (wall-clock seconds).
  Everything outside `timing` is a deterministic function of the inputs and the flags;
  `--deterministic-report` leaves `timing` out so that the whole file is byte-identical.
* with a policy: top level `policy_version`, and per weight (after everything else) the encoding
  a version-2 policy may set per tensor: `base_kind`, `row_scale`, `delta_norm_clamp`;
  `autotune_attempts` hold the original's fields except the wall-clock `seconds` (in `timing`);
* fields of features we do not implement (tiles, k-selector) carry the values the
  original writes for its default flags (§6.5, §10.2); the logging-only FFN proxy (§6.4) is
  computed as the original does, except that the replaced pre-activation includes the row scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from seeddelta import __version__
from seeddelta.outputs import dumps_strict, write_text_atomic

FNV_OFFSET_QUIRK = 1469598103934665603  # the original's basis: 14695981039346656037 with a digit lost
FNV_PRIME = 1099511628211


def fnv1a64(data: bytes, basis: int = FNV_OFFSET_QUIRK) -> int:
    h = basis
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def policy_hash(data: bytes) -> str:
    """`fnv1a64:<16 hex>` of the policy file bytes, with the original's offset basis."""
    return f"fnv1a64:{fnv1a64(data):016x}"


# Per-weight fields in the order the original writes them (§10.2), with defaults for entries
# that carry no encoding (missing_tensor, disabled, missing_imatrix).
WEIGHT_FIELDS: tuple[tuple[str, Any], ...] = (
    ("layer", 0), ("kind", ""), ("n_in", 0), ("n_out", 0), ("K_budget", 0), ("K", 0), ("block", 0),
    ("n_blocks", 0), ("has_w", False), ("has_x", False), ("base_L", 0), ("base_B", 0),
    ("ops_dense", 0), ("ops_base", 0), ("ops_delta", 0), ("ops_row_scale", 0), ("ops_total", 0),
    ("ops_ratio", 0.0),
    ("rel_l2_mean", 0.0), ("rel_l2_p95", 0.0), ("cos_mean", 0.0), ("cos_p05", 0.0), ("norm_ratio_mean", 0.0),
    ("rel_l2_mean_w", 0.0), ("rel_l2_p95_w", 0.0), ("cos_mean_w", 0.0), ("cos_p05_w", 0.0),
    ("norm_ratio_mean_w", 0.0),
    ("rel_l2_mean_x", 0.0), ("rel_l2_p95_x", 0.0), ("cos_mean_x", 0.0), ("cos_p05_x", 0.0),
    ("norm_ratio_mean_x", 0.0),
    ("rel_l2_mean_x_w", 0.0), ("rel_l2_p95_x_w", 0.0), ("cos_mean_x_w", 0.0), ("cos_p05_x_w", 0.0),
    ("norm_ratio_mean_x_w", 0.0),
    ("gating_enabled", False), ("gating_metric", ""), ("gating_value", 0.0), ("gating_p05", 0.0),
    ("gating_min_mean", 0.0), ("gating_min_p05", 0.0), ("gating_pass", False), ("metric_used", ""),
    ("targets_used", None), ("stack_cost_delta", 0.0), ("stack_cost_total", 0.0), ("ffn_score", 0.0),
    ("ffn_proxy_available", False), ("ffn_proxy_reason", ""), ("ffn_proxy_scope", ""),
    ("ffn_proxy_base_used", False), ("ffn_proxy_eval_x", 0), ("ffn_proxy_eval_out", 0), ("ffn_proxy_seed", 0),
    ("ffn_proxy_cos_mean", 0.0), ("ffn_proxy_cos_p05", 0.0), ("ffn_proxy_l2_mean", 0.0),
    ("ffn_proxy_l2_p95", 0.0), ("ffn_proxy_log_norm_ratio_mean", 0.0), ("ffn_proxy_log_norm_ratio_p95", 0.0),
    ("emit", False), ("strip_dense", False), ("decision", ""), ("reject_reason", ""),
    ("tile_rows", 0), ("tile_rows_align", 0), ("k_total_per_tensor", 0), ("k_levels", None),
    ("unique_k_count", 0), ("tiles_rounded_count", 0), ("tiles_rounded_pct", 0.0),
    ("tiles_dropped_count", 0), ("tiles_dropped_pct", 0.0), ("k_per_tile", None), ("kselector_mode", ""),
    ("kselector_rank", 0), ("kselector_tiles_sampled", 0), ("kselector_gap_vs_uniform", 0.0),
    ("k_custom_used", False), ("k_requested_stats", None), ("k_selected_stats", None),
    ("autotune_enabled", False), ("autotune_selected_budget", 0), ("autotune_attempts", None),
    # --- our additions ---
    ("dense_type", ""), ("bytes_dense", 0), ("bytes_seeddelta", 0), ("bits_per_weight", 0.0),
)
WEIGHT_FIELD_NAMES = tuple(name for name, _ in WEIGHT_FIELDS)
# Written only by builds with a policy, after everything else: the per-tensor encoding a version-2
# policy may set (what `policy export` needs to reproduce the file).
POLICY_WEIGHT_FIELDS = ("base_kind", "row_scale", "delta_norm_clamp", "dense_rows", "delta_regime")
# Written only for weights encoded as a SeedΔ variant, at the very end: the variant's settings (an object
# as `VariantSpec.to_json` writes it) and the ggml type its quantized base was stored in.
VARIANT_WEIGHT_FIELDS = ("variant", "base_type")
OUR_WEIGHT_FIELDS = ("dense_type", "bytes_dense", "bytes_seeddelta", "bits_per_weight")

TOP_FIELDS_ORIGINAL = (
    "input", "output", "base", "policy_file", "policy_hash", "base_kind", "base_max_samples",
    "base_perm_trials", "imatrix_file", "imatrix_eps", "imatrix_power", "imatrix_datasets", "resid",
    "eval_cols", "eval_x", "stack_pass_gate_up", "stack_pass_down", "weights",
)
TOP_FIELDS_OURS = (
    "seeddelta_py_version", "input_bytes", "output_bytes", "bytes_added", "bytes_stripped", "bytes_replaced", "policy_version",
    "timing",
)

METRIC_FIELDS = tuple(
    f"{stem}{suffix}"
    for suffix in ("", "_w", "_x", "_x_w")
    for stem in ("rel_l2_mean", "rel_l2_p95", "cos_mean", "cos_p05", "norm_ratio_mean")
)


def weight_entry(**values: Any) -> dict[str, Any]:
    """A per-weight entry with every field of §10.2 (+ ours) in order; unknown names are an error.
    The policy fields (POLICY_WEIGHT_FIELDS) are appended only when given."""
    unknown = set(values) - set(WEIGHT_FIELD_NAMES) - set(POLICY_WEIGHT_FIELDS) - set(VARIANT_WEIGHT_FIELDS)
    if unknown:
        raise KeyError(f"unknown report field(s): {', '.join(sorted(unknown))}")
    entry: dict[str, Any] = {}
    for name, default in WEIGHT_FIELDS:
        if name in values:
            entry[name] = values[name]
        elif name == "targets_used":
            entry[name] = {"tau_mean": values.get("gating_min_mean", 0.0), "tau_p05": values.get("gating_min_p05", 0.0)}
        elif name in ("k_levels", "k_per_tile", "autotune_attempts"):
            entry[name] = []
        elif name in ("k_requested_stats", "k_selected_stats"):
            entry[name] = {"has": False, "min": 0, "max": 0, "mean": 0}
        elif name == "reject_reason":
            entry[name] = values.get("decision", "")
        else:
            entry[name] = default
    for name in POLICY_WEIGHT_FIELDS + VARIANT_WEIGHT_FIELDS:
        if name in values:
            entry[name] = values[name]
    return entry


def tile_fields(n_out: int, k_eff: int, tile_align: int = 32, tile_rows: int = 0) -> dict[str, Any]:
    """§6.5 tile / K-selector metadata for the original's default `--k-selector cycle` and no
    `--K-levels` (report-only; the stored tensors always use one uniform K)."""
    if n_out <= 0:
        return {}
    align = max(1, tile_align)
    base_rows = min(tile_rows, n_out) if tile_rows > 0 else n_out
    rows = min(-(-base_rows // align) * align, n_out)
    n_tiles = -(-n_out // rows)
    levels = [k_eff] if k_eff > 0 else []
    per_tile = [levels[t % len(levels)] for t in range(n_tiles)] if levels else []
    rounded = 1 if n_out % rows else 0
    return {
        "tile_rows": rows,
        "tile_rows_align": align,
        "k_total_per_tensor": int(sum(per_tile)),
        "k_levels": levels,
        "unique_k_count": len(set(per_tile)),
        "tiles_rounded_count": rounded,
        "tiles_rounded_pct": 100.0 * rounded / n_tiles,
        "tiles_dropped_count": 0,
        "tiles_dropped_pct": 0.0,
        "k_per_tile": per_tile,
        "kselector_mode": "cycle",
        "kselector_rank": 1,
        "kselector_tiles_sampled": n_tiles,
        "kselector_gap_vs_uniform": 0.0,
    }


def ffn_score(metrics: Mapping[str, Any]) -> float:
    """§6.3: min(cos_mean, cos_p05) of the first available of em_x_w, em_x, em_w, em."""
    has_x, has_w = bool(metrics.get("has_x")), bool(metrics.get("has_w"))
    for suffix, available in (("_x_w", has_x and has_w), ("_x", has_x), ("_w", has_w), ("", True)):
        mean, p05 = float(metrics.get(f"cos_mean{suffix}", 0.0)), float(metrics.get(f"cos_p05{suffix}", 0.0))
        if available and not (mean == 0.0 and p05 == 0.0):
            return min(mean, p05)
        if suffix == "":
            return min(mean, p05)
    return 0.0


def dumps(report: Mapping[str, Any]) -> str:
    """JSON text: 2-space indent, key order kept, non-finite numbers as null (never NaN/Infinity)."""
    return dumps_strict(dict(report))


def write_report(path: str, report: Mapping[str, Any]) -> None:
    write_text_atomic(path, dumps(report), "report")


def top_level(
    *,
    input_path: str,
    output_path: str,
    base: bool,
    policy_file: str,
    policy_bytes: bytes | None,
    base_max_samples: int,
    base_perm_trials: int,
    imatrix_file: str | None,
    imatrix_eps: float,
    imatrix_power: float,
    imatrix_datasets: list[str],
    resid: Mapping[str, Any],
    eval_cols: int,
    eval_x: int,
    stack_pass_gate_up: int,
    stack_pass_down: int,
    weights: list[dict[str, Any]],
    input_bytes: int,
    output_bytes: int,
    bytes_added: int,
    bytes_stripped: int,
    bytes_replaced: int = 0,
    timing: Mapping[str, Any] | None = None,
    policy_version: int | None = None,
) -> dict[str, Any]:
    """The top-level object in the order of §10.1, then our fields."""
    out: dict[str, Any] = {
        "input": input_path,
        "output": output_path,
        "base": base,
        "policy_file": policy_file,
        "policy_hash": policy_hash(policy_bytes) if policy_bytes is not None else "",
    }
    if base:
        out["base_kind"] = "xor_circulant"
        out["base_max_samples"] = base_max_samples
        out["base_perm_trials"] = base_perm_trials
    if imatrix_file is not None:
        out["imatrix_file"] = imatrix_file
        out["imatrix_eps"] = imatrix_eps
        out["imatrix_power"] = imatrix_power
        out["imatrix_datasets"] = list(imatrix_datasets)
    out["resid"] = dict(resid)
    out["eval_cols"] = eval_cols
    out["eval_x"] = eval_x
    out["stack_pass_gate_up"] = stack_pass_gate_up
    out["stack_pass_down"] = stack_pass_down
    out["weights"] = weights
    out["seeddelta_py_version"] = __version__
    out["input_bytes"] = input_bytes
    out["output_bytes"] = output_bytes
    out["bytes_added"] = bytes_added
    out["bytes_stripped"] = bytes_stripped
    out["bytes_replaced"] = bytes_replaced
    if policy_version is not None:
        out["policy_version"] = policy_version
    if timing is not None:
        out["timing"] = dict(timing)
    return out


def resid_object(*, scheme: str, block: int, K: int, K_gate: int, K_up: int, K_down: int,
                 idx_type: str, val_type: str, row_scale: bool) -> dict[str, Any]:
    """`resid` (CLI-level values; `block` only for scheme block, as the original)."""
    out: dict[str, Any] = {"scheme": scheme}
    if scheme == "block":
        out["block"] = block
    out.update({"K": K, "K_gate": K_gate, "K_up": K_up, "K_down": K_down, "idx_type": idx_type,
                "val_type": val_type, "row_scale": row_scale})
    return out
