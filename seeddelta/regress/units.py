"""B2–B4 of the user's plan on a model: one unit at a time, separated layers against the sum of their
single effects, stacks growing to their first cliff, and what the measurements recommend.

* **B2** — each layer × FFN tensor alone, at each budget (K = density·n_in per kind) with and
  without the XOR base (imatrix and row scale on, dense stripped); plus each whole layer alone at the
  default configuration (the largest density, base on) — the unit B3 and B4 are made of.
* **B3** — 2–4 layers at least one layer apart, together, against the sum of their single-layer
  ΔNLLs; the difference with a window-bootstrap interval (paired on the same windows).
* **B4** — three orders (contiguous from the first layer; interleaved: every second layer first;
  safest-first by B2), growing one layer at a time until the first cliff (`criteria`); Spearman's
  ρ between every weight-space metric of the build report and the measured ΔNLL of the B2 units.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from seeddelta.codec.pruning import keep_count
from seeddelta.gguf_format.schema import KINDS
from seeddelta.regress.criteria import CLIFF_DELTA_NLL, CLIFF_KLD, FRAGILE_DELTA_NLL
from seeddelta.regress.measure import METRIC_KEYS, Spec
from seeddelta.regress.stats import bootstrap_windows, spearman

Run = Callable[[list[Spec], str], list[dict[str, Any]]]
SHORT = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


@dataclass(frozen=True)
class Config:
    density: Fraction
    base: bool

    @property
    def label(self) -> str:
        return f"d={self.density.numerator}/{self.density.denominator} {'base' if self.base else 'no base'}"


def encoding(cfg: Config, dims: Mapping[str, int]) -> dict[str, Any]:
    """Build flags of a configuration: K per kind from the density, imatrix and row scale on."""
    ks = {kind: keep_count(float(cfg.density), dims[kind]) for kind in KINDS}
    return {"K": ks["ffn_gate"], "K_gate": ks["ffn_gate"], "K_up": ks["ffn_up"], "K_down": ks["ffn_down"],
            "base": cfg.base, "row_scale": True, "imatrix": True}


def unit_row(result: Mapping[str, Any], ctx: int = 512) -> dict[str, Any]:
    """The figures of one measurement at one context, with its window-bootstrap interval."""
    m = result[f"ctx{ctx}"]
    boot = bootstrap_windows(m["window_delta_nll"])
    return {"delta_nll": m["delta_nll"], "delta_nll_se": m["delta_nll_se"], "boot_sd": boot["sd"],
            "ci95": [boot["lo95"], boot["hi95"]], "kld_mean": m["kld_mean"], "same_top_p": m["same_top_p"],
            "bytes_saved": result["build"]["bytes_saved"], "window_delta_nll": m["window_delta_nll"]}


# ---------------------------------------------------------------------------------- B2
def b2(run: Run, layers: Sequence[int], configs: Sequence[Config], default: Config, dims: Mapping[str, int],
       chunks: int) -> dict[str, Any]:
    specs, meta = [], []
    for cfg in configs:
        for layer in layers:
            for kind in KINDS:
                specs.append(Spec(f"b2-{layer}-{SHORT[kind]}-{cfg.label.replace(' ', '_').replace('/', 'o')}",
                                  encoding(cfg, dims), pairs=((layer, kind),), evals=((512, chunks),)))
                meta.append({"layer": layer, "kind": kind, "config": cfg.label, "density": str(cfg.density),
                             "base": cfg.base, "K": encoding(cfg, dims)[f"K_{SHORT[kind]}"]})
    for layer in layers:
        specs.append(Spec(f"b2-{layer}-layer", encoding(default, dims), pairs=tuple((layer, k) for k in KINDS),
                          evals=((512, chunks),)))
        meta.append({"layer": layer, "kind": "all", "config": default.label, "density": str(default.density),
                     "base": default.base})
    results = run(specs, "B2 one unit")
    rows = []
    for m, r in zip(meta, results, strict=True):
        row = {**m, **unit_row(r)}
        weights = [w for w in r["build"]["weights"] if w["emit"]]
        if m["kind"] != "all" and weights:
            row["metrics"] = {k: weights[0].get(k) for k in METRIC_KEYS}
        rows.append(row)
    return {"units": [r for r in rows if r["kind"] != "all"], "layers": [r for r in rows if r["kind"] == "all"]}


# ---------------------------------------------------------------------------------- B3
def separated_sets(layers: Sequence[int]) -> list[tuple[int, ...]]:
    """Sets of 2, 3 and 4 layers spread evenly over the selection (positions 0, s, 2s, … and 1, 1+s, …,
    with s = ⌊n/size⌋) whose layers are at least one layer apart (no two adjacent)."""
    ls = sorted(layers)
    out: list[tuple[int, ...]] = []
    for size in (2, 3, 4):
        step = len(ls) // size
        if step < 1:
            continue
        for start in (0, 1):
            chosen = tuple(ls[start + i * step] for i in range(size) if start + i * step < len(ls))
            if len(chosen) == size and all(b - a >= 2 for a, b in zip(chosen, chosen[1:], strict=False)) \
                    and chosen not in out:
                out.append(chosen)
    return out


def b3(run: Run, b2_layers: Sequence[Mapping[str, Any]], default: Config, dims: Mapping[str, int],
       chunks: int) -> list[dict[str, Any]]:
    single = {r["layer"]: r for r in b2_layers}
    sets = separated_sets(sorted(single))
    specs = [Spec("b3-" + "-".join(map(str, s)), encoding(default, dims), pairs=tuple((x, k) for x in s for k in KINDS),
                  evals=((512, chunks),)) for s in sets]
    out = []
    for s, r in zip(sets, run(specs, "B3 separated layers"), strict=True):
        joint = unit_row(r)
        per_window = [sum(single[x]["window_delta_nll"][i] for x in s) for i in range(len(joint["window_delta_nll"]))]
        diff = bootstrap_windows([j - p for j, p in zip(joint["window_delta_nll"], per_window, strict=True)])
        total = sum(single[x]["delta_nll"] for x in s)
        out.append({"layers": list(s), "joint_delta_nll": joint["delta_nll"], "joint_ci95": joint["ci95"],
                    "sum_of_singles": total, "ratio": joint["delta_nll"] / total if total > 0 else None,
                    "excess": diff["mean"], "excess_ci95": [diff["lo95"], diff["hi95"]],
                    "kld_mean": joint["kld_mean"], "bytes_saved": joint["bytes_saved"]})
    return out


# ---------------------------------------------------------------------------------- B4
def orders(layers: Sequence[int], b2_layers: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    ls = sorted(layers)
    safest = [r["layer"] for r in sorted(b2_layers, key=lambda r: (r["delta_nll"], r["layer"]))]
    return {"contiguous": ls, "interleaved": ls[0::2] + ls[1::2], "safest-first": safest}


def cliff_reasons(row: Mapping[str, Any], greedy: Mapping[str, Any] | None) -> list[str]:
    why = []
    if row["delta_nll"] > CLIFF_DELTA_NLL:
        why.append(f"ΔNLL {row['delta_nll']:+.4f} > {CLIFF_DELTA_NLL}")
    if row["kld_mean"] > CLIFF_KLD:
        why.append(f"KLD {row['kld_mean']:.4f} > {CLIFF_KLD}")
    if greedy is not None and greedy["verdict"] != "PASS":
        why.append(f"greedy FAIL ({'; '.join(greedy['reasons'])})")
    return why


def b4(run: Run, layers: Sequence[int], b2_layers: Sequence[Mapping[str, Any]], default: Config,
       dims: Mapping[str, int], chunks: int, greedy_limit: int | None) -> dict[str, Any]:
    """Every order grows one layer per round (the rounds of all orders are measured together) until its
    first cliff or its last layer."""
    seqs = orders(layers, b2_layers)
    steps: dict[str, list[dict[str, Any]]] = {name: [] for name in seqs}
    active = set(seqs)
    n = 0
    while active:
        n += 1
        names = sorted(active)
        specs = [Spec(f"b4-{name}-{n}", encoding(default, dims),
                      pairs=tuple((x, k) for x in seqs[name][:n] for k in KINDS), evals=((512, chunks),),
                      greedy_limit=greedy_limit) for name in names]
        for name, r in zip(names, run(specs, f"B4 stacks, {n} layer(s)"), strict=True):
            row = unit_row(r)
            why = cliff_reasons(row, r.get("greedy"))
            step = {"step": n, "added": seqs[name][n - 1], "layers": seqs[name][:n], **row, "cliff": why}
            if r.get("greedy"):
                step["greedy"] = {k: r["greedy"][k] for k in ("verdict", "flagged", "n", "accuracy")}
            step.pop("window_delta_nll")
            steps[name].append(step)
            if why or n >= len(seqs[name]):
                active.discard(name)
    cliffs = {}
    for name, st in steps.items():
        first = next((s for s in st if s["cliff"]), None)
        cliffs[name] = None if first is None else {"step": first["step"], "added": first["added"],
                                                   "why": first["cliff"], "layers_before": first["step"] - 1}
    return {"orders": seqs, "steps": steps, "cliffs": cliffs}


def correlations(units: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Spearman ρ between each weight-space metric of the build report and the measured ΔNLL, over all
    B2 single-tensor units and per kind. A metric that predicts damage correlates negatively for
    similarities (cos…, ffn_score) and positively for distances (rel_l2…)."""
    out = []
    for metric in METRIC_KEYS:
        for kind in ("all", *KINDS):
            pts = [(u["metrics"][metric], u["delta_nll"]) for u in units
                   if u.get("metrics") and u["metrics"].get(metric) is not None and kind in ("all", u["kind"])]
            if len(pts) < 3:
                continue
            s = spearman([p[0] for p in pts], [p[1] for p in pts])
            if s["rho"] == s["rho"]:  # not NaN: the metric varies
                out.append({"metric": metric, "kind": kind, **s})
    return sorted(out, key=lambda r: (r["kind"] != "all", -abs(r["rho"])))


# ---------------------------------------------------------------------------------- derived
def fragile_layers(b2_layers: Sequence[Mapping[str, Any]], units: Sequence[Mapping[str, Any]],
                   default: Config) -> list[dict[str, Any]]:
    """Layers sorted by their single-layer ΔNLL; fragile = above FRAGILE_DELTA_NLL with the bootstrap
    interval above 0; the tensor of the layer that costs the most alone (default configuration)."""
    out = []
    for r in sorted(b2_layers, key=lambda r: (-r["delta_nll"], r["layer"])):
        own = [u for u in units if u["layer"] == r["layer"] and u["config"] == default.label]
        worst = max(own, key=lambda u: u["delta_nll"]) if own else None
        out.append({"layer": r["layer"], "delta_nll": r["delta_nll"], "ci95": r["ci95"], "kld_mean": r["kld_mean"],
                    "fragile": r["delta_nll"] > FRAGILE_DELTA_NLL and r["ci95"][0] > 0,
                    "worst_tensor": None if worst is None else SHORT[worst["kind"]],
                    "worst_tensor_delta_nll": None if worst is None else worst["delta_nll"]})
    return out


def recommended_thresholds(units: Sequence[Mapping[str, Any]], cliffs: Mapping[str, Any],
                           corr: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """From the measurements: the similarity metric that best predicts damage (the most negative
    Spearman ρ over all units with p < 0.05 — a similarity must fall as damage rises), per kind the
    lowest value at and above which every measured unit stayed within FRAGILE_DELTA_NLL (the gate a
    policy could use), and the stack budget (layers before the earliest first cliff)."""
    out: dict[str, Any] = {"unit_delta_nll_limit": FRAGILE_DELTA_NLL}
    similar = [c for c in corr if c["kind"] == "all" and c["metric"].startswith(("cos", "ffn_score"))
               and c["rho"] < 0 and c["p"] < 0.05]
    best = min(similar, key=lambda c: c["rho"]) if similar else None
    if best is None:
        out["gate_metric"] = None
        out["gate_metric_why"] = ("no similarity metric of the build report correlates negatively with the measured "
                                  "ΔNLL at p < 0.05: none predicts the damage on these units")
    else:
        metric = best["metric"]
        per_kind = {}
        for kind in KINDS:
            pts = sorted((u["metrics"][metric], u["delta_nll"]) for u in units
                         if u["kind"] == kind and u.get("metrics") and u["metrics"].get(metric) is not None)
            thr = None
            for i, (value, _) in enumerate(pts):
                if all(d <= FRAGILE_DELTA_NLL for _, d in pts[i:]):
                    thr = {"min": value, "units_passing": len(pts) - i, "units": len(pts)}
                    break
            per_kind[SHORT[kind]] = thr
        out["gate_metric"] = {"metric": metric, "spearman_rho": best["rho"], "p": best["p"], "per_kind": per_kind}
    found = [c["layers_before"] for c in cliffs.values() if c is not None]
    out["max_layers_before_cliff"] = min(found) if found else None
    out["orders_without_cliff"] = sorted(k for k, c in cliffs.items() if c is None)
    return out
