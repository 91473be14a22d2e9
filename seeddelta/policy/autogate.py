"""Autogate's pure part: a scan file read and checked, its units filtered into candidates, the
candidates ordered into moves, and a selection written as a policy. No model is touched here;
`seeddelta.evaluation.autogate` evaluates the moves one at a time.

**Filters** (the original's, spec-policy-eval §4.4, with its defaults): `ffn_up` is denied unless
`allow_up`, `ffn_down` unless `enable_down`; a candidate needs `cos_mean_x_w` >= 0.70 and
`cos_p05_x_w` >= 0.50 (each read with the original's fallback to `cos_mean`/`cos_p05` when the
`_x_w` value is missing or 0, as in a scan without imatrix); `min_gap` keeps selected layers
more than `min_gap` apart (tensors of one layer may go together). Ours: a candidate must save
bytes; a **layer band** (`core`: the middle half of the layers, `leaf`: the outer quarters, or a
selector) admits layers outside it only with an extreme score — the scan's ΔNLL + 2·se at most
`band_extreme` (default 0: measurably harmless).

**Moves.** Every tensor may have several candidates (one per K in the scan). Its moves follow the
lower convex hull of (bytes saved, ΔNLL) from (0, 0): first the tensor at the K of the hull's first
point, then "upgrades" to the K of the next points (more bytes, more cost). With a byte budget the
moves of all tensors are taken in order of their marginal cost per byte saved — ΔNLL added per
byte gained, the Lagrangian allocation `llama-quantize --target-bpw` makes over quantization
types, here with the measured ΔNLL instead of a weight-error proxy; without a budget in order of
the measured ΔNLL of the move's candidate. A tensor's next move only becomes available after its
previous one was kept.

**Retention cap** (the v1 plan's mechanism 1 hard cap, opt-in): each candidate keeps its place in that
order, but the file a step builds — and the policy written — holds the unit at ⌈K·(1 + ret)/2⌉ entries
per row instead of K, ret ∈ [0, 1] the unit's retention in the scan: `retention` (the proxy,
cos_mean_x_w min–max scaled over the units of its kind and K) or `retention_replay` (mechanism 6: mixed
with the unit's measured damage on a replay pack, `seeddelta scan --replay`). The most faithful unit keeps
K, the least faithful half of it; the ranking and the filters still read the scan's figures at K.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from seeddelta.errors import SeedDeltaError
from seeddelta.policy.jsontext import JSONObject, join, json_type, read_json_file
from seeddelta.policy.schema import KINDS
from seeddelta.policy.selector import parse_selector, selector_layers

# The original autogate's "victory thresholds" (spec-policy-eval §10 item 2, §4.1 defaults).
GATE_COS_METRIC, GATE_COS_P05_METRIC = "cos_mean_x_w", "cos_p05_x_w"
GATE_COS_THRESHOLD, GATE_COS_P05_THRESHOLD = 0.70, 0.50
FALLBACK = {"cos_mean_x_w": "cos_mean", "cos_p05_x_w": "cos_p05"}
BAND_Z = 2.0  # outside the band: the scan's ΔNLL upper bound (mean + 2 se, ~97.5 % one-sided) must be extreme

Tensor = tuple[int, str]
NUMBERS = ("delta_nll", "delta_nll_se", "kld_mean", "cos_mean", "cos_p05", "cos_mean_x_w", "cos_p05_x_w")
ENCODING_KEYS = ("scheme", "block", "K_gate", "K_up", "K_down", "idx_type", "val_type", "row_scale", "imatrix",
                 "imatrix_eps", "imatrix_power", "base", "base_max_samples", "base_perm_trials", "seed",
                 "delta_norm_clamp_down")


@dataclass(frozen=True)
class Scan:
    path: str
    model_sha256: str
    text: str
    ctx: int
    chunks: int
    encoding: Mapping[str, Any]
    eval_cols: int
    eval_x: int
    units: tuple[Mapping[str, Any], ...]


def read_scan(path: str) -> Scan:
    """A file written by `seeddelta scan --json`, checked; errors name the file and the JSON path."""
    _, doc = read_json_file(path, "scan file")

    def fail(where: str, message: str) -> SeedDeltaError:
        return SeedDeltaError(f"{path}: {where}: {message}")

    if not isinstance(doc, dict):
        raise fail("top level", f"a scan must be a JSON object, got {json_type(doc)}")
    if isinstance(doc, JSONObject) and doc.duplicates:
        raise fail(doc.duplicates[0], "key given more than once")
    if "units" not in doc:
        raise fail("units", "missing: no measured units (a scan of the original's layer-scan script?); "
                            "run `seeddelta scan --json`")

    def get(obj: Any, where: str, key: str, kind: type | tuple[type, ...], *, positive: bool = False) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise fail(join(where, key) if where else key, "missing")
        value = obj[key]
        ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
        if kind in (int, float, (int, float)) and ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
        if not ok:
            raise fail(join(where, key) if where else key, f"must be {_type_name(kind)}, got {json_type(value)}")
        if positive and value <= 0:
            raise fail(join(where, key) if where else key, f"must be positive, got {value}")
        return value

    encoding = get(doc, "", "encoding", dict)
    for key in ENCODING_KEYS:
        if key not in encoding:
            raise fail(join("encoding", key), "missing")
    units = get(doc, "", "units", list)
    if not units:
        raise fail("units", "empty: nothing was scanned")
    seen: set[tuple[int, str, int]] = set()
    for i, unit in enumerate(units):
        where = join("units", i)
        if not isinstance(unit, dict):
            raise fail(where, f"must be an object, got {json_type(unit)}")
        layer = get(unit, where, "layer", int)
        if layer < 0:
            raise fail(join(where, "layer"), f"must be >= 0, got {layer}")
        kind = get(unit, where, "kind", str)
        if kind not in KINDS:
            raise fail(join(where, "kind"), f"unknown kind {kind!r} (expected {', '.join(KINDS)})")
        K = get(unit, where, "K", int, positive=True)
        for name in NUMBERS:
            get(unit, where, name, (int, float))
        if unit["delta_nll_se"] < 0:
            raise fail(join(where, "delta_nll_se"), f"must be >= 0, got {unit['delta_nll_se']}")
        get(unit, where, "bytes_saved", int)
        if (layer, kind, K) in seen:
            raise fail(where, f"second unit for blk.{layer}.{kind} K={K}")
        seen.add((layer, kind, K))
    return Scan(path=path, model_sha256=get(doc, "", "model_sha256", str), text=get(doc, "", "text", str),
                ctx=get(doc, "", "ctx", int, positive=True), chunks=get(doc, "", "chunks", int, positive=True),
                encoding=dict(encoding), eval_cols=get(doc, "", "eval_cols", int),
                eval_x=get(doc, "", "eval_x", int), units=tuple(units))


def _type_name(kind: type | tuple[type, ...]) -> str:
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer"
    if kind in (float, (int, float)):
        return "a finite number"
    return {str: "a string", dict: "an object", list: "an array"}.get(kind, str(kind))  # type: ignore[call-overload]


@dataclass(frozen=True)
class Filters:
    allow_up: bool = False
    enable_down: bool = False
    min_gap: int = 1
    cos_metric: str = GATE_COS_METRIC
    cos_p05_metric: str = GATE_COS_P05_METRIC
    cos_threshold: float = GATE_COS_THRESHOLD
    cos_p05_threshold: float = GATE_COS_P05_THRESHOLD
    band: frozenset[int] | None = None  # None: every layer
    band_extreme: float = 0.0
    # v1 mechanism 4: keep only units whose tail error S_p95 is at most this quantile of the scanned units of
    # their kind (None: off). Filled in by `with_error_limits` from the scan.
    error_quantile: float | None = None
    error_limits: Mapping[str, float] = field(default_factory=dict)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule (src/llama-quant.cpp) for the layers whose ffn_down gets more bits in its Q4_K_M /
    Q5_K_M mixes: the first and last eighth and every third layer in between (C integer division)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def with_error_limits(f: Filters, units: Sequence[Mapping[str, Any]]) -> Filters:
    """`f` with the error limit of each kind: the `error_quantile` quantile (linear interpolation) of the
    scan's S_p95 over that kind's units. Unchanged when the filter is off."""
    import numpy as np

    if f.error_quantile is None:
        return f
    if not 0 <= f.error_quantile <= 1:
        raise SeedDeltaError(f"--error-quantile must be in [0, 1], got {f.error_quantile}")
    limits = {}
    for kind in KINDS:
        values = [float(u["S_p95"]) for u in units if u["kind"] == kind and u.get("S_p95") is not None]
        if values:
            limits[kind] = float(np.quantile(np.array(values), f.error_quantile))
    return replace(f, error_limits=limits)


def band_layers(spec: str, n_layer: int) -> frozenset[int] | None:
    """`all` → None; `core` → the middle half [n/4, n − 1 − n/4]; `leaf` → the outer quarters;
    `use_more_bits` → the layers llama.cpp's rule leaves unprotected; else a layer selector like "2-5,7"
    (the policy files' syntax)."""
    if spec == "all":
        return None
    if spec == "use_more_bits":
        return frozenset(i for i in range(n_layer) if not use_more_bits(i, n_layer))
    quarter = n_layer // 4
    core = frozenset(range(quarter, n_layer - quarter))
    if spec == "core":
        return core
    if spec == "leaf":
        return frozenset(range(n_layer)) - core
    try:
        layers = frozenset(selector_layers(parse_selector(spec)))
    except ValueError as exc:
        raise SeedDeltaError(f"--band: expected core, leaf, all or a layer list: {exc}") from None
    beyond = sorted(layer for layer in layers if layer >= n_layer)
    if beyond:
        raise SeedDeltaError(f"--band: layer {beyond[0]} is beyond the model (layers 0-{n_layer - 1})")
    return layers


def lookup(unit: Mapping[str, Any], metric: str) -> float | None:
    """The original's metric lookup (§4.2): the metric, or its fallback when it is missing or exactly 0
    while the fallback is not (a scan without imatrix writes 0 for the `_x_w` metrics)."""
    value = unit.get(metric)
    fallback = FALLBACK.get(metric)
    alt = unit.get(fallback) if fallback else None
    if value is None or (value == 0 and alt not in (None, 0)):
        return float(alt) if alt is not None else None
    return float(value)


def rejection(unit: Mapping[str, Any], f: Filters) -> str:
    """Why a scan unit cannot be a candidate ('' when it can)."""
    kind = unit["kind"]
    if kind == "ffn_up" and not f.allow_up:
        return "ffn_up is denied by default (--allow-up)"
    if kind == "ffn_down" and not f.enable_down:
        return "ffn_down is off by default (--enable-down)"
    mean, p05 = lookup(unit, f.cos_metric), lookup(unit, f.cos_p05_metric)
    if mean is None or p05 is None:
        return f"no {f.cos_metric}/{f.cos_p05_metric} in the scan"
    if mean < f.cos_threshold:
        return f"{f.cos_metric} {mean:.4f} < {f.cos_threshold}"
    if p05 < f.cos_p05_threshold:
        return f"{f.cos_p05_metric} {p05:.4f} < {f.cos_p05_threshold}"
    if unit["bytes_saved"] <= 0:
        return f"saves no bytes ({unit['bytes_saved']:+,} B)"
    limit = f.error_limits.get(kind)
    if limit is not None and (unit.get("S_p95") is None or float(unit["S_p95"]) > limit):
        return f"tail error S_p95 {unit.get('S_p95')} above the {f.error_quantile:g} quantile of its kind ({limit:.4f})"
    if f.band is not None and unit["layer"] not in f.band:
        upper = unit["delta_nll"] + BAND_Z * unit["delta_nll_se"]
        if upper > f.band_extreme:
            return f"outside the band and ΔNLL + {BAND_Z:g}·se = {upper:+.5f} > {f.band_extreme:g}"
    return ""


RETENTION_FIELDS = {"proxy": "retention", "replay": "retention_replay"}  # --retention → the scan field


def retention_cap(K: int, ret: float) -> int:
    """Mechanism 1's hard cap: ⌈K·(1 + ret)/2⌉ entries per row (ret 1 keeps K, ret 0 half of it), at least 1."""
    return max(1, math.ceil(K * (1 + ret) / 2))


def retention_caps(scan: Scan, source: str) -> dict[tuple[int, str, int], int]:
    """Every scan unit's capped K under the retention `source` (proxy|replay); one-line errors naming the unit
    when the scan does not carry that retention or it is not a number in [0, 1]."""
    if source not in RETENTION_FIELDS:
        raise SeedDeltaError(f"--retention: expected {' or '.join(RETENTION_FIELDS)}, got {source!r}")
    name = RETENTION_FIELDS[source]
    how = ("make the scan with `seeddelta scan --replay PACK` (a pack from `seeddelta replay-pack`)"
           if source == "replay" else "make the scan again with this version of `seeddelta scan`")
    caps = {}
    for i, u in enumerate(scan.units):
        ret = u.get(name)
        if ret is None:
            raise SeedDeltaError(f"{scan.path}: {join(join('units', i), name)}: missing, so --retention {source} has "
                                 f"nothing to read: {how}")
        if isinstance(ret, bool) or not isinstance(ret, (int, float)) or not 0.0 <= float(ret) <= 1.0:
            raise SeedDeltaError(f"{scan.path}: {join(join('units', i), name)}: must be a number in [0, 1], got {ret!r}")
        caps[(int(u["layer"]), str(u["kind"]), int(u["K"]))] = retention_cap(int(u["K"]), float(ret))
    return caps


@dataclass(frozen=True)
class Move:
    """Put `tensor` at K (from `from_K`, None: not selected yet): its scan figures and marginal cost."""

    tensor: Tensor
    K: int
    from_K: int | None
    unit: Mapping[str, Any]
    d_bytes: int
    d_nll: float

    @property
    def per_byte(self) -> float:
        return self.d_nll / self.d_bytes

    def scan_figures(self) -> dict[str, Any]:
        u = self.unit
        return {"delta_nll": u["delta_nll"], "delta_nll_se": u["delta_nll_se"], "kld_mean": u["kld_mean"],
                "bytes_saved": u["bytes_saved"], "cos_mean_x_w": u["cos_mean_x_w"], "cos_p05_x_w": u["cos_p05_x_w"],
                "cos_mean": u["cos_mean"], "cos_p05": u["cos_p05"], "marginal_bytes": self.d_bytes,
                "marginal_delta_nll": self.d_nll, "delta_nll_per_mb": self.per_byte * 1e6}


def hull_moves(tensor: Tensor, units: Sequence[Mapping[str, Any]]) -> list[Move]:
    """The tensor's moves along the lower convex hull of (bytes saved, ΔNLL) from (0, 0)."""
    points = sorted(units, key=lambda u: (u["bytes_saved"], u["delta_nll"], u["K"]))
    hull: list[Mapping[str, Any]] = []

    def xy(u: Mapping[str, Any] | None) -> tuple[float, float]:
        return (0.0, 0.0) if u is None else (float(u["bytes_saved"]), float(u["delta_nll"]))

    for u in points:
        if hull and u["bytes_saved"] == hull[-1]["bytes_saved"]:
            continue  # same saving, not cheaper (sorted by ΔNLL): dominated
        while hull:
            (x0, y0), (x1, y1), (x2, y2) = xy(hull[-2] if len(hull) > 1 else None), xy(hull[-1]), xy(u)
            if (y1 - y0) * (x2 - x0) >= (y2 - y0) * (x1 - x0):  # hull[-1] on or above the chord: not convex
                hull.pop()
            else:
                break
        hull.append(u)
    moves, prev = [], None
    for u in hull:
        (x0, y0), (x1, y1) = xy(prev), xy(u)
        moves.append(Move(tensor, int(u["K"]), None if prev is None else int(prev["K"]), u, int(x1 - x0), y1 - y0))
        prev = u
    return moves


@dataclass
class MoveQueue:
    """The next move of every tensor, cheapest first (by cost per byte with a budget, else by ΔNLL)."""

    by_bytes: bool
    moves: dict[Tensor, list[Move]]
    heap: list[tuple[float, int, int, int, int]] = field(default_factory=list)  # ties: layer, then gate, up, down

    def __post_init__(self) -> None:
        for tensor in self.moves:
            self._push(tensor, 0)

    def _push(self, tensor: Tensor, index: int) -> None:
        if index < len(self.moves[tensor]):
            m = self.moves[tensor][index]
            key = m.per_byte if self.by_bytes else float(m.unit["delta_nll"])
            heapq.heappush(self.heap, (key, tensor[0], KINDS.index(tensor[1]), m.K, index))

    def pop(self) -> tuple[Move, int] | None:
        if not self.heap:
            return None
        _, layer, kind, _, index = heapq.heappop(self.heap)
        return self.moves[(layer, KINDS[kind])][index], index

    def kept(self, move: Move, index: int) -> None:
        """The move was kept: the tensor's next move becomes available."""
        self._push(move.tensor, index + 1)


def candidates(scan: Scan, f: Filters) -> tuple[dict[Tensor, list[Move]], list[dict[str, Any]]]:
    """The moves of every tensor with at least one admissible unit, and every refused unit with its reason."""
    refused: list[dict[str, Any]] = []
    admitted: dict[Tensor, list[Mapping[str, Any]]] = {}
    for u in scan.units:
        reason = rejection(u, f)
        if reason:
            refused.append({"layer": u["layer"], "kind": u["kind"], "K": u["K"], "reason": reason,
                            "delta_nll": u["delta_nll"], "bytes_saved": u["bytes_saved"]})
        else:
            admitted.setdefault((u["layer"], u["kind"]), []).append(u)
    return {t: hull_moves(t, us) for t, us in sorted(admitted.items(), key=lambda kv: (kv[0][0], KINDS.index(kv[0][1])))}, refused


def gap_conflict(layer: int, selected_layers: set[int], min_gap: int) -> int | None:
    """A selected layer within `min_gap` of `layer` (another layer), or None."""
    for s in sorted(selected_layers):
        if s != layer and abs(s - layer) <= min_gap:
            return s
    return None


def policy_document(selection: Mapping[Tensor, int], encoding: Mapping[str, Any]) -> dict[str, Any]:
    """The policy of a selection: every tensor off (gating off) except the selected ones, each enabled
    with its K and its dense weight stripped. Version 2, with the encoding's base and row scale in
    `defaults` (and the ffn_down norm clamp per tensor), when the scan used any of them; else version 1
    — a file the original builder reads."""
    v2 = bool(encoding.get("base")) or bool(encoding.get("row_scale")) or float(encoding.get("delta_norm_clamp_down", 0)) > 0
    defaults: dict[str, Any] = {"enabled": False, "strip_dense": False,
                                "gating": {"metric": "cos", "min_mean": -1.0, "min_p05": -1.0},
                                "autotune": {"enabled": False}}
    if v2:
        defaults["base"] = "xor_circulant" if encoding.get("base") else "none"
        defaults["row_scale"] = bool(encoding.get("row_scale"))
    layers: dict[str, Any] = {}
    for (layer, kind), K in sorted(selection.items(), key=lambda kv: (kv[0][0], KINDS.index(kv[0][1]))):
        rule: dict[str, Any] = {"enabled": True, "strip_dense": True, "K": int(K)}
        if v2 and kind == "ffn_down" and float(encoding.get("delta_norm_clamp_down", 0)) > 0:
            rule["delta_norm_clamp"] = float(encoding["delta_norm_clamp_down"])
        layers.setdefault(str(layer), {"tensors": {}})["tensors"][kind] = rule
    return {"version": 2 if v2 else 1, "defaults": defaults, "layers": layers}


def build_flags(encoding: Mapping[str, Any], K: int) -> list[str]:
    """The `seeddelta build` flags that reproduce the scan's encoding next to the policy (everything the
    policy cannot say: imatrix, seed, scheme, value/index types, base fit; K for the file's global keys)."""
    from seeddelta.builder.options import BuildOptions

    defaults = BuildOptions(input="", output="")
    flags = ["--K", str(K)] if K != defaults.K else []
    names = {"K_gate": "--K-gate", "K_up": "--K-up", "K_down": "--K-down"}
    for key in ENCODING_KEYS:
        value = encoding[key]
        if key in ("row_scale", "base") or value == getattr(defaults, key):
            continue  # base and row scale: in the policy
        flag = names.get(key, "--" + key.replace("_", "-"))
        flags += [flag, str(value)]
    return flags
