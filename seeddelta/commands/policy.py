"""`seeddelta policy check|resolve|export`: validate a policy, show what it decides, export one.

* `check FILE [--policy-strict]` — load and validate (the original's schema, or ours under
  `"version": 2`); warnings on stderr; exit 2 with one line naming file and place on error.
* `resolve FILE [-m MODEL] [--json PATH]` — every layer × kind of the model (only its layer
  count is read): the resolved setting and, per value, where it came from (`baseline`,
  `defaults`, `ranges[1]`, `layers.12`, `layers.12.tensors.ffn_down`). The baseline flags are
  the builder's (`--K`, `--K-gate`, …, `--block`, `--strip-dense`).
* `export REPORT.json -o POLICY.json` — the canonical policy of a build report's decisions.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from seeddelta.assets import TINY_MODEL
from seeddelta.commands.common import Subparsers, add_input, add_output, model_path
from seeddelta.errors import SeedDeltaError


def register(sub: Subparsers) -> None:
    p = sub.add_parser("policy", help="check, resolve or export a policy JSON",
                       description="Validate a policy JSON, show every layer x tensor's setting and where each "
                       "value came from, or export the canonical policy of a build report.")
    actions = p.add_subparsers(dest="policy_action", metavar="ACTION")
    actions.required = True

    c = actions.add_parser("check", help="validate a policy file",
                           description="Load and validate a policy; warnings on stderr, exit status 2 with one line "
                           "naming the file and place on error.")
    add_input(c, "file", metavar="FILE", help="policy JSON")
    _strict_arg(c)
    c.set_defaults(handler=run_check)

    r = actions.add_parser("resolve", help="every layer x tensor's setting and where each value came from",
                           description="Every layer x tensor of a model resolved under a policy, with the source "
                           "of each value (only the model's layer count is read).")
    add_input(r, "file", metavar="FILE", help="policy JSON")
    add_input(r, "-m", "--model", default=None, metavar="MODEL", implied=TINY_MODEL,
              help="GGUF model (default: the tiny model)")
    add_output(r, "--json", default=None, metavar="PATH", help="write the resolution as JSON")
    _strict_arg(r)
    r.add_argument("--K", type=int, default=32, metavar="N", help="baseline budget per output row (32)")
    for kind in ("gate", "up", "down"):
        r.add_argument(f"--K-{kind}", dest=f"K_{kind}", type=int, default=-1, metavar="N",
                       help=f"baseline budget for ffn_{kind} (-1: --K)")
    r.add_argument("--block", type=int, default=32, metavar="N", help="baseline block size (32)")
    r.add_argument("--strip-dense", action="store_true", help="baseline strip_dense (off)")
    r.set_defaults(handler=run_resolve)

    e = actions.add_parser("export", help="canonical policy from a build report's final decisions",
                           description="Write the canonical policy of a build report's final decisions.")
    add_input(e, "report", metavar="REPORT.json", help="report.json of `seeddelta build --report-json`")
    add_output(e, "-o", "--output", required=True, metavar="POLICY.json", help="policy file to write")
    e.add_argument("--emit-only", action="store_true",
                   help="only the emitted tensors (default: every report entry, as the builder's --policy-export)")
    e.set_defaults(handler=run_export)


def _strict_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy-strict", "--strict", dest="strict", action="store_true",
                   help="unknown keys (and keys without effect) are errors, not warnings")


def _print_warnings(warnings: tuple[str, ...]) -> None:
    for w in warnings:
        print(f"seeddelta policy: warning: {w}", file=sys.stderr)


def run_check(args: argparse.Namespace) -> int:
    from seeddelta.layers import format_layers
    from seeddelta.policy import check_policy, load_policy, selector_layers

    policy = load_policy(args.file, strict=args.strict)
    check_policy(policy)
    _print_warnings(policy.warnings)
    named = sorted({layer for r in policy.ranges for layer in selector_layers(r.intervals)} | set(policy.layers))
    parts = [f"version {policy.version}", "defaults" if policy.defaults is not None else "no defaults",
             f"{len(policy.ranges)} range(s)", f"{len(policy.layers)} layer entr{'y' if len(policy.layers) == 1 else 'ies'}",
             f"layers named: {format_layers(named) or 'none'}"]
    if policy.warnings:
        parts.append(f"{len(policy.warnings)} warning(s)")
    print(f"{args.file}: ok ({', '.join(parts)}) {policy.hash}")
    return 0


def run_resolve(args: argparse.Namespace) -> int:
    from seeddelta.builder.options import BuildOptions
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.outputs import write_json_atomic
    from seeddelta.policy import baseline_from_options, load_policy, resolve_all
    from seeddelta.policy.schema import MAX_BLOCK

    if args.K <= 0:
        raise SeedDeltaError(f"--K must be a positive integer, got {args.K}")
    for kind in ("gate", "up", "down"):
        value = getattr(args, f"K_{kind}")
        if value <= 0 and value != -1:
            raise SeedDeltaError(f"--K-{kind} must be a positive integer (or -1 for --K), got {value}")
    if not 1 <= args.block <= MAX_BLOCK:
        raise SeedDeltaError(f"--block must be in 1..{MAX_BLOCK}, got {args.block}")
    policy = load_policy(args.file, strict=args.strict)
    model_file = str(model_path(args))
    model = GGUFModel(model_file, what="model")
    opts = BuildOptions(input=model_file, output="", K=args.K, K_gate=args.K_gate, K_up=args.K_up,
                        K_down=args.K_down, block=args.block, strip_dense=args.strip_dense)
    baseline = baseline_from_options(opts)
    rows = resolve_all(policy, model.n_layer, baseline, model=f"model {model_file}")
    if args.json:
        write_json_atomic(args.json, {
            "policy": args.file, "policy_hash": policy.hash, "version": policy.version, "strict": bool(args.strict),
            "warnings": list(policy.warnings), "model": model_file, "n_layer": model.n_layer,
            "baseline": {"enabled": baseline.enabled, "strip_dense": baseline.strip_dense, "block": baseline.block,
                         "K": dict(baseline.K), "metric": baseline.metric,
                         "thresholds": {k: {"min_mean": m, "min_p05": p} for k, (m, p) in baseline.thresholds.items()},
                         "base": baseline.base, "row_scale": baseline.row_scale,
                         "delta_norm_clamp": dict(baseline.delta_norm_clamp)},
            "tensors": [row.to_json() for row in rows],
        }, "resolution JSON")
    _print_warnings(policy.warnings)  # after the only write, so a failed write prints nothing but its error
    print(f"policy {args.file} (version {policy.version}, {policy.hash}) on {model_file}: "
          f"{model.n_layer} layers x 3 kinds")
    for row in rows:
        print(_line(row.to_json(), with_v2=policy.version >= 2))
    return 0


def _line(row: dict[str, Any], *, with_v2: bool) -> str:
    src = row["source"]

    def show(name: str, value: Any) -> str:
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, float):
            value = f"{value:.3f}"
        return f"{name}={value}[{src[name]}]"

    at = row["autotune"]
    parts = [f"blk.{row['layer']}.{row['kind']}", show("enabled", row["enabled"]),
             show("strip_dense", row["strip_dense"]), show("block", row["block"]), show("K", row["K"]),
             show("metric", row["metric"]), show("min_mean", row["min_mean"]), show("min_p05", row["min_p05"]),
             f"gating={'on' if row['gating_enabled'] else 'off'}",
             f"autotune={'on' if at['enabled'] else 'off'}[{src['autotune']}]",
             "k_schedule=" + ",".join(str(k) for k in row["k_schedule"])]
    if with_v2:
        parts += [show("base", row["base"]), show("row_scale", row["row_scale"]),
                  show("delta_norm_clamp", row["delta_norm_clamp"])]
    return " ".join(parts)


def run_export(args: argparse.Namespace) -> int:
    import json

    from seeddelta.outputs import same_file, write_text_atomic
    from seeddelta.policy import export_report_file

    if same_file(args.report, args.output):
        raise SeedDeltaError(f"-o {args.output} is the report itself; choose another path")
    text = export_report_file(args.report, emit_only=args.emit_only)
    policy = json.loads(text)
    rules = [r for layer in policy["layers"].values() for r in layer["tensors"].values()]
    write_text_atomic(args.output, text, "policy output")
    print(f"wrote {args.output}: {len(rules)} tensor rule(s), {sum(1 for r in rules if r['enabled'])} emitted")
    return 0
