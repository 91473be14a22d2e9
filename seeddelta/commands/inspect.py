"""`seeddelta inspect FILE.gguf [--json] [--check]`: what SeedΔ tensors a GGUF holds (ours or the
original's), and whether they can run.

Per weight: layer, kind, scheme, K (and blocks), base geometry (L, B), row scale, whether the
dense weight is stripped, stored bytes, per-tensor keys, and whether its arrays pass the runtime's
validation (indices in range, permutations, finite values, consistent shapes); then the file's
totals and global `seeddelta.*` keys. The file-schema extensions a weight uses are shown per weight:
`delta_regime/1` as its regime (statistic, bounds as stored in float32, and the direction: Δ applied
`above` a lower bound, `below` an upper one, `between` both, or `always`), `dense_rows/1` as the number
of output rows kept dense. With --check the exit status is 1 when a weight is invalid."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from seeddelta.commands.common import Subparsers, add_input


def extensions_of(entry: Any) -> dict[str, Any]:
    """The file-schema extensions one weight uses, read from its stored arrays ({} when none). A weight
    whose extension arrays are malformed shows the extension with null figures (its problem is reported
    by the validation)."""
    from seeddelta.codec.regime import DeltaRegime
    from seeddelta.errors import SeedDeltaError

    out: dict[str, Any] = {}
    name = f"blk.{entry.layer}.{entry.kind}"
    if "rg_stat" in entry.tensors and "rg_lim" in entry.tensors:
        views = entry.views()
        try:
            r = DeltaRegime.from_tensors(name, views["rg_stat"], views["rg_lim"])
        except SeedDeltaError:
            out["delta_regime/1"] = None
        else:
            lo, hi = (None if math.isinf(r.min) else r.min), (None if math.isinf(r.max) else r.max)
            direction = {(True, False): "above", (False, True): "below", (True, True): "between",
                         (False, False): "always"}[(lo is not None, hi is not None)]
            out["delta_regime/1"] = {"statistic": r.statistic, "min": lo, "max": hi, "direction": direction}
    if "dr_idx" in entry.tensors:
        shape = entry.tensors["dr_idx"].shape
        out["dense_rows/1"] = {"rows": int(shape[0]) if len(shape) == 1 else None, "of": entry.n_out}
    return out


def regime_text(regime: dict[str, Any] | None) -> str:
    """'Δ when rms ≥ 0.5 (above)' and the like."""
    if regime is None:
        return "malformed"
    stat, lo, hi = regime["statistic"], regime["min"], regime["max"]
    direction = regime["direction"]
    if direction == "above":
        cond = f"{stat} ≥ {lo:.6g}"
    elif direction == "below":
        cond = f"{stat} ≤ {hi:.6g}"
    elif direction == "between":
        cond = f"{lo:.6g} ≤ {stat} ≤ {hi:.6g}"
    else:
        cond = f"any {stat}"
    return f"Δ when {cond} ({direction})"


def inspect_file(path: str) -> dict[str, Any]:
    from seeddelta.gguf_format.extensions import EXTENSIONS_KEY, declared
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.seeddelta_tensors import entry_problem, global_seeddelta_kv, seeddelta_entries

    model = GGUFModel(path, require_llama=False, what="file")
    entries = seeddelta_entries(model)
    weights: list[dict[str, Any]] = []
    for e in entries:
        problem = entry_problem(e)
        weights.append({
            "layer": e.layer,
            "kind": e.kind,
            "n_in": e.n_in,
            "n_out": e.n_out,
            "scheme": e.scheme,
            "variant": e.variant,
            "coding": e.coding if e.variant is not None else None,
            "base_type": e.base_type,
            "K": e.K,
            "block": e.block,
            "n_blocks": e.n_blocks,
            "base": e.has_base,
            "base_L": e.base_L,
            "base_B": e.base_B,
            "row_scale": e.row_scale,
            "stripped": e.stripped,
            "dense_type": e.dense_type,
            "bytes_dense": e.dense_nbytes,
            "bytes_seeddelta": e.nbytes,
            "bits_per_weight": 8.0 * e.nbytes / (e.n_in * e.n_out) if e.n_in and e.n_out else 0.0,
            "dtypes": e.dtypes(),
            "kv": e.kv,
            "extensions": extensions_of(e),
            "valid": problem is None,
            "problem": problem,
        })
    total_sd = sum(w["bytes_seeddelta"] for w in weights)
    return {
        "file": model.path,
        "architecture": model.arch,
        "file_bytes": model.file_size,
        "n_layer": model.n_layer,
        "n_embd": model.n_embd,
        "n_ff": model.n_ff,
        "n_tensors": len(model.tensors),
        "alignment": model.alignment,
        "seeddelta_kv": global_seeddelta_kv(model),
        "extensions": list(declared(model.get(EXTENSIONS_KEY), model.path)),
        "weights": weights,
        "totals": {
            "weights": len(weights),
            "stripped": sum(1 for w in weights if w["stripped"]),
            "with_base": sum(1 for w in weights if w["base"]),
            "with_row_scale": sum(1 for w in weights if w["row_scale"]),
            "bytes_seeddelta": total_sd,
            "bytes_dense_kept": sum(w["bytes_dense"] for w in weights),
            "invalid": sum(1 for w in weights if not w["valid"]),
        },
    }


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"{info['file']}: {info['architecture'] or '?'} n_layer={info['n_layer']} n_embd={info['n_embd']} "
        f"n_ff={info['n_ff']} tensors={info['n_tensors']} bytes={info['file_bytes']}",
    ]
    if info["seeddelta_kv"]:
        lines.append("keys: " + " ".join(f"{k.removeprefix('seeddelta.')}={_fmt(v)}"
                                         for k, v in info["seeddelta_kv"].items()))
    if not info["weights"]:
        lines.append("no SeedΔ tensors")
        return "\n".join(lines)
    header = f"{'layer':>5} {'kind':<8} {'scheme':<6} {'K':>6} {'blk':>4} {'L':>6} {'B':>3} {'rs':<3} " \
             f"{'strip':<5} {'bytes':>10} {'bpw':>6} {'dense':>10} valid"
    lines.append(header)
    for w in info["weights"]:
        scheme = w["scheme"] if w["variant"] is None else f"{w['variant']}-{w['coding']}"
        lines.append(
            f"{w['layer']:>5} {w['kind'].removeprefix('ffn_'):<8} {scheme:<6} {w['K']:>6} "
            f"{w['block'] or '-':>4} {w['base_L'] or w['base_type'] or '-':>6} {w['base_B'] or '-':>3} "
            f"{'yes' if w['row_scale'] else 'no':<3} {'yes' if w['stripped'] else 'no':<5} "
            f"{w['bytes_seeddelta']:>10} {w['bits_per_weight']:>6.2f} "
            f"{(w['dense_type'] or '-') if not w['stripped'] else 'stripped':>10} {'yes' if w['valid'] else 'NO'}"
        )
    for w in info["weights"]:
        ext = w["extensions"]
        if "delta_regime/1" in ext:
            lines.append(f"  blk.{w['layer']}.{w['kind']}: delta_regime/1 {regime_text(ext['delta_regime/1'])}")
        if "dense_rows/1" in ext:
            d = ext["dense_rows/1"]
            lines.append(f"  blk.{w['layer']}.{w['kind']}: dense_rows/1 {d['rows']} of {d['of']} rows dense")
    t = info["totals"]
    lines.append(
        f"total: {t['weights']} weight(s), {t['stripped']} stripped, {t['with_base']} with base, "
        f"{t['with_row_scale']} with row scale; SeedΔ {t['bytes_seeddelta']} B, dense kept {t['bytes_dense_kept']} B"
    )
    if t["invalid"]:
        lines.append(f"INVALID: {t['invalid']} weight(s) cannot run (ppl, kld, greedy, imatrix and sweep refuse "
                     "this file):")
        lines += [f"  {w['problem']}" for w in info["weights"] if not w["valid"]]
    else:
        lines.append("valid: every SeedΔ weight passes the runtime's checks")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def register(sub: Subparsers) -> None:
    p = sub.add_parser("inspect", help="list the SeedΔ tensors of a GGUF and check that they can run",
                       description="What SeedΔ tensors a GGUF holds (ours or the original's) and whether each "
                       "passes the runtime's validation; exit status 1 with --check when one does not.")
    add_input(p, "file", metavar="FILE.gguf", help="GGUF file to inspect")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--check", action="store_true",
                   help="exit status 1 when a SeedΔ weight is invalid (out-of-range index, not a permutation, "
                        "NaN/Inf, bad shape)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2, allow_nan=False))
    else:
        print(format_text(info))
    return 1 if args.check and info["totals"]["invalid"] else 0
