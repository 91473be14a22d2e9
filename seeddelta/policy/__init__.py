"""Policy files: which layers and tensors get SeedΔ, with what K, strip, gating and autotune.

The original's JSON schema (spec-policy-eval §1–3) with its aliases and precedence, loud
errors where the original silently misread a file, our own keys under `"version": 2`, per-value
provenance, the builder's Resolver, canonical export from a report, and the original's presets.

    policy = load_policy("p.json", strict=True)
    rows = resolve_all(policy, n_layer=32)          # every layer × kind, with sources
    resolver = policy_resolver(policy, build_opts)  # for seeddelta.builder

`seeddelta.policy.build.build(opts)` is `seeddelta build` with `--policy`/`--policy-export`;
`seeddelta.policy.autogate` is autogate's pure part (scan files, filters, moves, output policy).
"""

from __future__ import annotations

from seeddelta.policy.builder import baseline_from_options, policy_resolver, tensor_config
from seeddelta.policy.export import export_policy, export_report_file, export_text
from seeddelta.policy.load import load_policy, parse_policy, policy_from_json
from seeddelta.policy.resolve import (
    BASELINE,
    Baseline,
    Resolved,
    check_layers,
    check_policy,
    resolve,
    resolve_all,
    sources,
)
from seeddelta.policy.schema import Autotune, Policy, RangeRule, Rule
from seeddelta.policy.selector import parse_selector, selector_layers

__all__ = [
    "BASELINE", "Autotune", "Baseline", "Policy", "RangeRule", "Resolved", "Rule", "baseline_from_options",
    "check_layers",
    "check_policy", "export_policy", "export_report_file", "export_text", "load_policy", "parse_policy",
    "parse_selector", "policy_from_json", "policy_resolver", "resolve", "resolve_all", "selector_layers", "sources",
    "tensor_config",
]
