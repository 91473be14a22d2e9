"""The builder: a llama GGUF in, a SeedΔ GGUF (and report.json) out — `seeddelta build`.

Four named phases: **plan** (resolve every selected weight's `TensorConfig` — from `--policy`, or
any `Resolver` — and check everything that can fail before any work), **encode and decide**
(`builder.encode`: one weight dequantized, encoded at one K and measured on its stored arrays;
`builder.decide`: in build order, the K schedule tried until gating passes, the stack guard and
the stack-cost cap), **assemble** (report entries in build order, tensors to drop and add, keys
to set) and **write** (one atomic copy of the input with those changes).

`--policy` files are loaded and turned into a Resolver by `seeddelta.policy.build`, which calls
`run_build` with it (and writes `--policy-export`): the builder knows resolvers, not policy files.

Deterministic: the seed of every tensor is derived from `--seed`, the layer and the kind
(`tensor_seed`), never from the order of work or the wall clock, so the same inputs and flags
give a byte-identical GGUF and — apart from the separate `timing` object — report.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from gguf import GGUFValueType

from seeddelta.builder.decide import decide_all
from seeddelta.builder.encode import WeightResult, stub_entry
from seeddelta.builder.options import (
    BuildOptions,
    Resolver,
    TensorConfig,
    baseline_resolver,
    clamp_K,
    validate_options,
)
from seeddelta.builder.report import (
    resid_object,
    top_level,
    write_report,
)
from seeddelta.builder.spill import SpillFile
from seeddelta.codec.partial import EXTENSION as DENSE_ROWS_EXTENSION
from seeddelta.codec.regime import EXTENSION as REGIME_EXTENSION
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.extensions import EXTENSIONS_KEY
from seeddelta.gguf_format.imatrix_file import Imatrix, read_imatrix
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import (
    EXT_VERSION_KEY,
    KINDS,
    KNOWN_VARIANTS,
    SEEDDELTA_SUFFIXES,
    TENSOR_VARIANT_KEY,
    VARIANT_KEY,
    seeddelta_tensor_name,
    tensor_kv_prefix,
    weight_name,
)
from seeddelta.gguf_format.writer import KV, AddedTensor, write_model_copy
from seeddelta.layers import parse_layers
from seeddelta.resources import reuse_freed_memory


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


def _global_keys(opts: BuildOptions, any_seeddelta: bool, any_strip: bool, results: list[WeightResult]) -> list[KV]:
    """The original's global keys, from the command line (policy K and block are not reflected, as in
    the original); base and row scale also count when a version-2 policy gave them to a written tensor."""
    u32, b = GGUFValueType.UINT32, GGUFValueType.BOOL
    written = [r.entry for r in results if r.entry is not None and r.entry.get("emit")]
    use_base = opts.base or any(e.get("base_kind", "none") != "none" for e in written)
    use_row_scale = opts.row_scale or any(e.get("row_scale") for e in written)
    k_default = max(1, opts.K)
    ks = {kind: opts.kind_K(kind) for kind in KINDS}
    variable = any(v != k_default for v in ks.values())
    keys = [
        KV("seeddelta.enabled", any_seeddelta, b),
        KV("seeddelta.version", 1, u32),
        KV("seeddelta.scheme", 0 if opts.scheme == "coo" else 1, u32),
        KV("seeddelta.row_scale", use_row_scale, b),
        KV("seeddelta.resid.K", k_default, u32),
        KV("seeddelta.strip_dense", any_strip, b),
    ]
    if opts.scheme == "block":
        keys.append(KV("seeddelta.resid.block", opts.block, u32))
    keys.append(KV("seeddelta.resid.K_variable", variable, b))
    if variable:
        keys += [KV("seeddelta.resid.K_gate", ks["ffn_gate"], u32), KV("seeddelta.resid.K_up", ks["ffn_up"], u32),
                 KV("seeddelta.resid.K_down", ks["ffn_down"], u32)]
    keys.append(KV("seeddelta.base.enabled", use_base, b))
    if use_base:
        keys += [
            KV("seeddelta.base.kind", 1, u32), KV("seeddelta.base.depth", 2, u32), KV("seeddelta.base.R", 1, u32),
            KV("seeddelta.base.max_samples", max(0, opts.base_max_samples), u32),
            KV("seeddelta.base.perm_trials", max(1, opts.base_perm_trials), u32),
        ]
    # the variant extension (docs/file-format.md): which family and which version of its definition
    variants = sorted({str(e["variant"]["name"]) for e in written if isinstance(e.get("variant"), dict)})
    if len(variants) > 1:
        raise SeedDeltaError(f"internal: one file holds one variant family, got {', '.join(variants)}")
    if variants:
        keys += [KV(VARIANT_KEY, variants[0], GGUFValueType.STRING),
                 KV(EXT_VERSION_KEY, KNOWN_VARIANTS[variants[0]], u32)]
    # opt-in schema extensions are declared (gguf_format.extensions)
    extensions = [name for name, used in ((DENSE_ROWS_EXTENSION, any(e.get("dense_rows") for e in written)),
                                          (REGIME_EXTENSION, any(e.get("delta_regime") for e in written))) if used]
    if extensions:
        keys.append(KV(EXTENSIONS_KEY, extensions, GGUFValueType.ARRAY, GGUFValueType.STRING))
    return keys


def _tensor_keys(entry: dict[str, Any]) -> list[KV]:
    """Per-tensor keys (spec §8.4). They describe the file: a tensor not written has gating_pass false
    and K 0 (the original wrote the rejected trial's K, and gating_pass true for a stack-cost-cap
    rejection; the report keeps both), so that a rebuild from the exported policy — where that
    tensor is simply disabled — gives the same file byte for byte."""
    prefix = tensor_kv_prefix(entry["layer"], entry["kind"])
    b = GGUFValueType.BOOL
    emit = bool(entry["emit"])
    keys = [
        KV(f"{prefix}.enabled", emit, b),
        KV(f"{prefix}.gating_pass", bool(entry["gating_pass"]) and emit, b),
        KV(f"{prefix}.strip_dense", bool(entry["strip_dense"]), b),
        KV(f"{prefix}.K", max(0, int(entry["K"])) if emit else 0, GGUFValueType.UINT32),
    ]
    if emit and isinstance(entry.get("variant"), dict):
        keys.append(KV(f"{prefix}.{TENSOR_VARIANT_KEY}", str(entry["variant"]["name"]), GGUFValueType.STRING))
    return keys


@dataclass
class BuildPlan:
    """The plan phase's outcome: what happens to every selected (layer, kind), in build order."""

    steps: list[tuple[int, str, str, TensorConfig | None]]  # (layer, kind, action, cfg); action: encode|keep|missing|disabled
    existing: list[tuple[int, str]]  # weights the input already holds as SeedΔ
    keep_existing: set[tuple[int, str]]  # ... kept unchanged because their dense weight is absent

    @property
    def tasks(self) -> list[tuple[int, str, TensorConfig]]:
        return [(layer, kind, cfg) for layer, kind, action, cfg in self.steps if action == "encode" and cfg is not None]


@dataclass
class Assembly:
    """The assemble phase's outcome: report entries in build order, and the output's tensors and keys."""

    results: list[WeightResult]
    drop_tensors: set[str]
    add_tensors: list[AddedTensor]
    drop_keys: set[str]
    set_keys: list[KV]
    bytes_added: int
    bytes_stripped: int
    bytes_replaced: int
    pass_gate_up: int
    pass_down: int


def plan_build(model: GGUFModel, opts: BuildOptions, resolve: Resolver, imatrix: Imatrix | None,
               log: TextIO) -> BuildPlan:
    """Resolve every selected weight's configuration and check, before any work, that it can be encoded."""
    existing = model.seeddelta_weights()
    if existing and not opts.overwrite_existing:
        first = existing[0]
        raise SeedDeltaError(
            f"input already holds SeedΔ tensors for {len(existing)} weight(s) (e.g. blk.{first[0]}.{first[1]}); "
            "pass --overwrite-existing to re-encode them"
        )
    steps: list[tuple[int, str, str, TensorConfig | None]] = []
    keep_existing: set[tuple[int, str]] = set()
    clamped: dict[tuple[str, int, int], int] = {}  # (kind, K asked, n_in) -> weights
    for layer in parse_layers(opts.layers, model.n_layer, note=lambda m: print(f"warning: {m}", file=log)):
        for kind in KINDS:
            name = weight_name(layer, kind)
            cfg = resolve(layer, kind)
            if cfg.enabled:  # a disabled tensor needs nothing (the original checked it anyway, §11 item 19)
                _check_requirements(name, cfg, opts, imatrix)
            if not model.has(name):
                if (layer, kind) in existing:
                    keep_existing.add((layer, kind))
                    steps.append((layer, kind, "keep", cfg))
                else:
                    steps.append((layer, kind, "missing", cfg))
                continue
            if len(model.tensors[name].shape) != 2:
                continue  # not a matrix: skipped silently, as the original
            if not cfg.enabled:
                steps.append((layer, kind, "disabled", cfg))
                continue
            spec = cfg.variant if cfg.variant is not None else opts.variant_spec()
            if cfg.K < (0 if spec.is_variant else 1):  # a variant may keep 0 entries: its quantized base alone
                raise SeedDeltaError(f"{name}: K must be a positive integer, got {cfg.K}")
            n_in = int(model.tensors[name].shape[0])
            if spec.is_variant:
                from seeddelta.builder.variant import check_variant_inputs

                check_variant_inputs(opts, spec, name, n_in, int(model.tensors[name].shape[1]))
            if imatrix is not None:
                imatrix.entry(name, n_in)  # fail before any work if it does not match
            if cfg.K > n_in:
                clamped[(kind, cfg.K, n_in)] = clamped.get((kind, cfg.K, n_in), 0) + 1
            steps.append((layer, kind, "encode", cfg))
    for (kind, k, n_in), count in sorted(clamped.items()):
        print(f"warning: K {k} for {kind} exceeds its {n_in} inputs: {count} weight(s) keep all {n_in} entries per "
              f"row (K {n_in} is stored; the weight is reproduced exactly, at more bytes than dense)", file=log)
    for layer, kind in sorted(keep_existing):
        print(f"warning: blk.{layer}.{kind}: dense weight is absent (stripped); its existing SeedΔ tensors are "
              "kept unchanged", file=log)
    return BuildPlan(steps, existing, keep_existing)


def _check_requirements(name: str, cfg: TensorConfig, opts: BuildOptions, imatrix: Imatrix | None) -> None:
    if not cfg.gating_enabled:
        return
    where = f"{name} (policy {opts.policy})" if opts.policy else name
    if opts.eval_cols <= 0:
        raise SeedDeltaError(f"{where}: gating on {cfg.metric} needs --eval-cols > 0 (a negative threshold in the "
                             "policy switches gating off)")
    if cfg.require_eval_x and opts.eval_x <= 0:
        raise SeedDeltaError(f"{where}: gating metric {cfg.metric} needs --eval-cols > 0 and --eval-x > 0")
    if cfg.require_imatrix and imatrix is None:
        raise SeedDeltaError(f"{where}: gating metric {cfg.metric} needs --imatrix")


def assemble(model: GGUFModel, opts: BuildOptions, plan: BuildPlan, decided: dict[tuple[int, str], WeightResult],
             log: TextIO) -> Assembly:
    """Report entries in build order, and the tensors and keys of the output."""
    results: list[WeightResult] = []
    pass_gate_up, pass_down = 0, 0
    for layer, kind, action, plan_cfg in plan.steps:
        if action == "encode":
            res = decided[(layer, kind)]
            assert res.entry is not None
            if res.entry["emit"]:
                if kind == "ffn_down":
                    pass_down += 1
                else:
                    pass_gate_up += 1
            for w in res.warnings:
                print(f"warning: {w}", file=log)
            results.append(res)
        elif action == "missing":
            if opts.report_json is not None or opts.policy is not None:
                results.append(WeightResult(layer, kind, stub_entry(opts, layer, kind, plan_cfg, "missing_tensor")))
        elif action == "disabled":
            n_in, n_out = model.weight_dims(layer, kind)
            results.append(WeightResult(layer, kind, stub_entry(opts, layer, kind, plan_cfg, "disabled", n_in, n_out)))

    processed = {(r.layer, r.kind) for r in results}
    drop_tensors: set[str] = set()
    bytes_replaced = 0
    for layer, kind in plan.existing:
        if (layer, kind) in processed and (layer, kind) not in plan.keep_existing:
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

    remaining = [lk for lk in plan.existing if lk not in processed or lk in plan.keep_existing]
    any_strip = any(r.strip for r in results) or any(not model.has(weight_name(*lk)) for lk in remaining)
    any_seeddelta = bool(add_tensors) or bool(remaining)
    if opts.strip_dense and not any(r.strip for r in results):
        print("warning: --strip-dense was given but no dense weight was stripped", file=log)

    drop_keys = {k for k in model.kv_keys() if k.startswith("seeddelta.") and not k.startswith("seeddelta.blk.")}
    for layer, kind in processed:
        prefix = tensor_kv_prefix(layer, kind) + "."
        drop_keys.update(k for k in model.kv_keys() if k.startswith(prefix))
    set_keys = _global_keys(opts, any_seeddelta, any_strip, results)
    for res in results:
        assert res.entry is not None
        set_keys += _tensor_keys(res.entry)
    return Assembly(results, drop_tensors, add_tensors, drop_keys, set_keys,
                    sum(r.added_bytes for r in results), bytes_stripped, bytes_replaced, pass_gate_up, pass_down)


def _read_policy_bytes(opts: BuildOptions) -> bytes | None:
    if opts.policy is None:
        return None
    try:
        with open(opts.policy, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise SeedDeltaError(f"cannot read policy {opts.policy}: {exc.strerror or exc}") from None


def run_build(opts: BuildOptions, resolver: Resolver | None = None, *,
              log: TextIO | None = None, policy_version: int | None = None) -> BuildResult:
    """Build the SeedΔ GGUF (and report) described by `opts`: plan → encode and decide → assemble →
    write. `resolver`: each weight's TensorConfig (default: the command line's). `policy_version`:
    recorded in the report of a build with a policy file (seeddelta.policy.build).
    Raises SeedDeltaError on bad input, before any work where it can be known then."""
    t_start = time.perf_counter()
    log = log if log is not None else sys.stderr
    validate_options(opts)
    policy_bytes = _read_policy_bytes(opts)
    model = GGUFModel(opts.input)
    imatrix = read_imatrix(opts.imatrix) if opts.imatrix else None

    plan = plan_build(model, opts, resolver or baseline_resolver(opts), imatrix, log)
    spill = SpillFile(os.path.dirname(os.path.abspath(opts.output)))
    # The input's metadata is ~250 000 small objects (a tokenizer's strings and scores) that live as long
    # as the build: frozen, the cyclic garbage collector stops re-scanning them on every full pass
    # (~3 % of a SmolLM2 build, measured); whatever the build creates is still collected as usual.
    gc.freeze()
    try:
        with reuse_freed_memory():  # numpy temporaries reused, not page-faulted in afresh
            decided = decide_all(model, opts, plan.tasks, imatrix, log, policy_fields=policy_version is not None,
                                 spill=spill)
            # the budgets actually used (a K above a weight's n_in is clamped) go into the global keys and the report
            n_in_by_kind: dict[str, int] = {}
            for layer, kind, _cfg in plan.tasks:
                n_in_by_kind[kind] = max(n_in_by_kind.get(kind, 0), model.weight_dims(layer, kind)[0])
            opts = clamp_K(opts, n_in_by_kind)
            out = assemble(model, opts, plan, decided, log)
            write_model_copy(model, opts.output, drop_tensors=out.drop_tensors, add_tensors=out.add_tensors,
                             drop_keys=out.drop_keys, set_keys=out.set_keys)
    finally:
        spill.close()
        gc.unfreeze()

    output_bytes = os.path.getsize(opts.output)
    seconds = time.perf_counter() - t_start
    resid = resid_object(
        scheme=opts.scheme, block=opts.block, K=max(1, opts.K), K_gate=opts.kind_K("ffn_gate"),
        K_up=opts.kind_K("ffn_up"), K_down=opts.kind_K("ffn_down"), idx_type=opts.idx_type,
        val_type=opts.val_type, row_scale=opts.row_scale,
    )
    timing = None if opts.deterministic_report else {
        "total_seconds": seconds,
        "weights": [{"layer": r.layer, "kind": r.kind, "seconds": r.seconds,
                     **({"attempt_seconds": r.attempt_seconds} if r.attempt_seconds else {})}
                    for r in out.results if r.seconds > 0],
    }
    report = top_level(
        input_path=opts.input, output_path=opts.output, base=opts.base, policy_file=opts.policy or "",
        policy_bytes=policy_bytes, base_max_samples=opts.base_max_samples, base_perm_trials=max(1, opts.base_perm_trials),
        imatrix_file=opts.imatrix, imatrix_eps=opts.imatrix_eps, imatrix_power=opts.imatrix_power,
        imatrix_datasets=imatrix.datasets if imatrix is not None else [], resid=resid,
        eval_cols=opts.eval_cols, eval_x=opts.eval_x, stack_pass_gate_up=out.pass_gate_up,
        stack_pass_down=out.pass_down, weights=[r.entry for r in out.results if r.entry is not None],
        input_bytes=model.file_size, output_bytes=output_bytes, bytes_added=out.bytes_added,
        bytes_stripped=out.bytes_stripped, bytes_replaced=out.bytes_replaced, timing=timing,
        policy_version=policy_version,
    )
    if opts.report_json:
        write_report(opts.report_json, report)
    return BuildResult(report, out.results, output_bytes, model.file_size, out.bytes_added, out.bytes_stripped,
                       out.bytes_replaced, seconds)


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
