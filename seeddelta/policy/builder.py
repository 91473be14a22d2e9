"""The builder's view of a policy: a `Resolver` giving each (layer, kind) its `TensorConfig`.

`seeddelta build` asks `resolver(layer, kind) -> TensorConfig` for every weight it visits
(seeddelta.builder). Without a policy it uses `baseline_resolver(opts)`; with one, the policy is
resolved on top of the same CLI baseline (`baseline_from_options`), as the original did.

`seeddelta build --policy P` loads P and builds through `policy_resolver(policy, opts, n_layer)`.
The TensorConfig carries the autotune schedule (already deduplicated and cut to `max_iters`) and
the version-2 keys `base`, `row_scale`, `delta_norm_clamp` — but only where a policy rule set
them; a value that comes from the baseline stays None, meaning "the command line's", so a policy
that sets nothing gives exactly the command line's TensorConfig.
"""

from __future__ import annotations

from seeddelta.builder.options import BuildOptions, Resolver, TensorConfig
from seeddelta.policy.resolve import BASELINE, Baseline, Resolved, resolve, resolve_all
from seeddelta.policy.schema import KINDS, Policy


def baseline_from_options(opts: BuildOptions) -> Baseline:
    """The CLI baseline of spec §1.7 from build options: --strip-dense, --block, the kinds' K
    (--K-<kind> if > 0, else --K), metric cos_x_w with the original's thresholds; our --base,
    --row-scale and --delta-norm-clamp-down (down only) as the starting values of the version-2 keys."""
    return Baseline(
        strip_dense=opts.strip_dense, block=opts.block, K={kind: opts.kind_K(kind) for kind in KINDS},
        base="xor_circulant" if opts.base else "none", row_scale=opts.row_scale,
        delta_norm_clamp={kind: {"ffn_down": opts.delta_norm_clamp_down, "ffn_gate": opts.delta_norm_clamp_gate}.get(
            kind, 0.0) for kind in KINDS},
        dense_rows={kind: opts.dense_rows_down if kind == "ffn_down" else 0.0 for kind in KINDS},
        delta_regime={kind: opts.delta_regime_gate if kind == "ffn_gate" else None for kind in KINDS},
        variant=opts.variant_spec(),
    )


def tensor_config(r: Resolved) -> TensorConfig:
    """The builder's per-tensor config of a resolved setting (K: this kind's budget)."""
    def from_policy(name: str) -> bool:
        return r.source[name] != BASELINE

    return TensorConfig(
        enabled=r.enabled, strip_dense=r.strip_dense, K=r.K, block=r.block, metric=r.metric,
        gating_enabled=r.gating_enabled, min_mean=r.min_mean, min_p05=r.min_p05,
        autotune=r.autotune.enabled, schedule=tuple(r.k_schedule()) if r.autotune.enabled else (),
        base=r.base if from_policy("base") else None,
        row_scale=r.row_scale if from_policy("row_scale") else None,
        delta_norm_clamp=r.delta_norm_clamp if from_policy("delta_norm_clamp") else None,
        variant=r.variant if from_policy("variant") else None,
        dense_rows=r.dense_rows if from_policy("dense_rows") else None,
        delta_regime=r.delta_regime if from_policy("delta_regime") else None,
    )


def policy_resolver(policy: Policy, opts: BuildOptions, n_layer: int | None = None) -> Resolver:
    """A builder Resolver for `policy` over the CLI baseline of `opts`.

    With `n_layer` every layer × kind is resolved at once, so a policy naming a layer beyond the
    model, or any resolution error, stops the build before any work; without it each call
    resolves lazily."""
    baseline = baseline_from_options(opts)
    if n_layer is not None:
        table = {(r.layer, r.kind): tensor_config(r) for r in resolve_all(policy, n_layer, baseline)}

        def resolve_table(layer: int, kind: str) -> TensorConfig:
            return table[(layer, kind)]
        return resolve_table

    def resolve_lazy(layer: int, kind: str) -> TensorConfig:
        return tensor_config(resolve(policy, layer, kind, baseline))
    return resolve_lazy
