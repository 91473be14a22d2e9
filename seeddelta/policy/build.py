"""`seeddelta build` with a policy file: load it, resolve it on the model's layers over the command
line's baseline, build through the builder's Resolver, and write `--policy-export`.

The builder (seeddelta.builder) knows Resolvers, not policy files; this module is where the two
meet, so that the builder package never imports the policy package.
"""

from __future__ import annotations

import sys
from typing import TextIO

from seeddelta.builder.options import BuildOptions, validate_options
from seeddelta.builder.pipeline import BuildResult, run_build
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.outputs import write_text_atomic
from seeddelta.policy.builder import policy_resolver
from seeddelta.policy.export import export_policy, export_text
from seeddelta.policy.load import load_policy


def build(opts: BuildOptions, *, log: TextIO | None = None) -> BuildResult:
    """`seeddelta build`: with `opts.policy`, every weight as the policy resolves it (a layer the policy
    names beyond the model is an error before any work); then `opts.policy_export`, the canonical
    policy of the build's decisions (spec-policy-eval §1.10), which rebuilds the same file."""
    log = log if log is not None else sys.stderr
    validate_options(opts)
    if opts.policy is None:
        result = run_build(opts, log=log)
    else:
        policy = load_policy(opts.policy, strict=opts.policy_strict)
        n_layer = GGUFModel(opts.input).n_layer
        resolver = policy_resolver(policy, opts, n_layer=n_layer)
        for warning in policy.warnings:
            print(f"warning: policy: {warning}", file=log)
        result = run_build(opts, resolver, log=log, policy_version=policy.version)
    if opts.policy_export:
        write_text_atomic(opts.policy_export, export_text(export_policy(result.report, opts.output)), "policy export")
    return result
