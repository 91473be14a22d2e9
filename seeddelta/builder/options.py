"""What a build is asked to do: `BuildOptions` (the original's flags) and, per weight, the resolved
`TensorConfig` a policy or the command line decides; their validation; per-weight seeds."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from seeddelta.codec.regime import DeltaRegime
from seeddelta.errors import SeedDeltaError
from seeddelta.gguf_format.schema import KINDS
from seeddelta.outputs import same_file

# Baseline gating thresholds of the original (Appendix A.1 step 5): (min_mean, min_p05).
BASELINE_THRESHOLDS = {"ffn_gate": (0.45, 0.30), "ffn_up": (0.45, 0.30), "ffn_down": (0.25, 0.15)}
GATING_METRICS = ("cos", "cos_w", "cos_x", "cos_x_w", "ffn_score")
_METRIC_GROUP = {"cos": "", "cos_w": "_w", "cos_x": "_x", "cos_x_w": "_x_w"}

VARIANTS = ("none", "sdq")
SDQ_CODINGS = ("coo", "c8")
SDQ_REFITS = ("none", "full")
SDQ_QUANTIZERS = ("rtn", "gptq")
BASE_FROM_FILE = "file"  # the quantized base of variant sdq taken from --quant-base-from


@dataclass(frozen=True)
class VariantSpec:
    """How a weight is encoded beyond the original's schema (docs/file-format.md, "Variants").

    `name` "none": plain SeedΔ (every other field ignored). "sdq": residual over a quantized base —
    `base_type` a ggml type gguf-py quantizes (Q4_0, Q8_0, MXFP4, …) or "file" (the weight as
    --quant-base-from stores it), `rotate` (random-sign Hadamard before quantizing), `holdout`
    (each row's K largest entries kept out of the quantization), `coding` of the residual (coo: 4 bytes
    per entry; c8: 2), `refit` of its values (none: the residual itself; full: least squares on
    --xtx), `quantizer` of the base (rtn: gguf-py's round-to-nearest; gptq: error feedback on --xtx)."""

    name: str = "none"
    base_type: str = "Q4_0"
    rotate: bool = False
    holdout: bool = False
    coding: str = "coo"
    refit: str = "none"
    quantizer: str = "rtn"

    @property
    def is_variant(self) -> bool:
        return self.name != "none"

    def to_json(self) -> dict[str, object]:
        if not self.is_variant:
            return {"name": "none"}
        return {"name": self.name, "base_type": self.base_type, "quantizer": self.quantizer, "rotate": self.rotate,
                "holdout": self.holdout, "coding": self.coding, "refit": self.refit}

    def problem(self) -> str | None:
        """Why this spec is not a valid one (None: it is)."""
        if self.name not in VARIANTS:
            return f"unknown variant {self.name!r} (expected {', '.join(VARIANTS)})"
        if not self.is_variant:
            return None
        from seeddelta.codec.quant_base import ENCODABLE_TYPES

        if self.base_type.upper() not in ENCODABLE_TYPES and self.base_type != BASE_FROM_FILE:
            return (f"quantized base type {self.base_type!r} cannot be encoded (gguf-py quantizes "
                    f"{', '.join(ENCODABLE_TYPES)}; K-/i-quants: give --quant-base-from a llama-quantize output)")
        if self.coding not in SDQ_CODINGS:
            return f"unknown residual coding {self.coding!r} (expected {', '.join(SDQ_CODINGS)})"
        if self.refit not in SDQ_REFITS:
            return f"unknown refit {self.refit!r} (expected {', '.join(SDQ_REFITS)})"
        if self.quantizer not in SDQ_QUANTIZERS:
            return f"unknown quantizer {self.quantizer!r} (expected {', '.join(SDQ_QUANTIZERS)})"
        if self.base_type == BASE_FROM_FILE and (self.rotate or self.holdout or self.quantizer != "rtn"):
            return "a base taken from --quant-base-from is used as stored (no rotation, holdout or gptq)"
        if self.quantizer == "gptq":
            from seeddelta.codec.gptq import GPTQ_TYPES

            if self.base_type.upper() not in GPTQ_TYPES:
                return f"quantizer gptq supports base types {', '.join(GPTQ_TYPES)}, not {self.base_type}"
        return None


@dataclass(frozen=True)
class BuildOptions:
    """Everything `seeddelta build` takes (names follow the original's flags, §11.1)."""

    input: str
    output: str
    layers: str | None = None
    scheme: str = "coo"
    block: int = 32
    K: int = 32
    K_gate: int = -1
    K_up: int = -1
    K_down: int = -1
    idx_type: str = "i16"
    val_type: str = "f16"
    row_scale: bool = False
    imatrix: str | None = None
    imatrix_eps: float = 1e-8
    imatrix_power: float = 1.0
    base: bool = False
    base_max_samples: int = 2048
    base_perm_trials: int = 1
    strip_dense: bool = False
    policy: str | None = None
    policy_strict: bool = False
    policy_export: str | None = None
    stack_cost_cap: float = math.inf
    eval_cols: int = 0
    eval_x: int = 0
    report_json: str | None = None
    seed: int = 1234
    delta_norm_clamp_down: float = 0.0
    delta_norm_clamp_gate: float = 0.0  # v1 mechanism 2: the same clamp for ffn_gate
    dense_rows_down: float = 0.0  # v1 H3b: share of ffn_down's rows kept dense (codec.partial); 0 = off
    delta_regime_gate: DeltaRegime | None = None  # v1 mechanism 3: ffn_gate's Δ only for tokens in it (codec.regime)
    # per-layer ffn_gate regimes (calibrated quantile bounds, evaluation.regime_calibration); a layer listed here
    # takes its regime over delta_regime_gate
    delta_regime_gate_layers: tuple[tuple[int, DeltaRegime], ...] = ()
    threads: int = 0  # 0: one per CPU
    overwrite_existing: bool = False
    deterministic_report: bool = False
    progress: bool = True
    # SeedΔ variants (ours): the command line's encoding of every weight a policy does not set
    variant: str = "none"
    quant_base: str = "Q4_0"
    quant_base_from: str | None = None
    rotate: bool = False
    holdout: bool = False
    coding: str = "coo"
    refit: str = "none"
    quantizer: str = "rtn"
    xtx: str | None = None

    def variant_spec(self) -> VariantSpec:
        base = BASE_FROM_FILE if self.quant_base_from is not None else self.quant_base
        return VariantSpec(self.variant, base, self.rotate, self.holdout, self.coding, self.refit, self.quantizer)

    def kind_K(self, kind: str) -> int:
        """Effective CLI budget of a kind (Appendix A.1 step 4): --K-<kind> if > 0, else --K (a variant
        may have K 0: its quantized base alone)."""
        per = {"ffn_gate": self.K_gate, "ffn_up": self.K_up, "ffn_down": self.K_down}[kind]
        if self.variant != "none":
            return per if per >= 0 else max(0, self.K)
        return per if per > 0 else max(1, self.K)


@dataclass(frozen=True)
class TensorConfig:
    """Resolved configuration of one (layer, kind): what a policy decides (Appendix A.2).

    Without a policy the baseline applies: enabled, `--strip-dense`, `--block`, the kind's K,
    metric `cos_x_w` with the baseline thresholds, gating disabled, no autotune, and the
    encoding of the command line.

    `autotune`/`schedule`: with autotune on, the K values tried in order (already deduplicated
    and cut to `max_iters`; empty: the single K). `base`, `row_scale`, `delta_norm_clamp`: a
    version-2 policy's per-tensor encoding; None follows the command line (`--base`,
    `--row-scale`, `--delta-norm-clamp-down` for ffn_down)."""

    enabled: bool
    strip_dense: bool
    K: int
    block: int
    metric: str = "cos_x_w"
    gating_enabled: bool = False
    min_mean: float = 0.45
    min_p05: float = 0.30
    autotune: bool = False
    schedule: tuple[int, ...] = ()
    base: str | None = None
    row_scale: bool | None = None
    delta_norm_clamp: float | None = None
    variant: VariantSpec | None = None  # None: the command line's (--variant …)
    dense_rows: float | None = None  # version 2: share of rows kept dense (codec.partial); None: the CLI's
    delta_regime: DeltaRegime | None = None  # version 2: Δ only for tokens in it (codec.regime); None: the CLI's

    def k_schedule(self) -> list[int]:
        """The K values the builder tries, in order (Appendix A.3 step 10)."""
        return list(self.schedule) if self.autotune and self.schedule else [self.K]

    @property
    def require_eval_x(self) -> bool:
        return self.gating_enabled and self.metric in ("cos_x", "cos_x_w", "ffn_score")

    @property
    def require_imatrix(self) -> bool:
        return self.gating_enabled and self.metric in ("cos_w", "cos_x_w", "ffn_score")


Resolver = Callable[[int, str], TensorConfig]


def baseline_resolver(opts: BuildOptions) -> Resolver:
    def resolve(layer: int, kind: str) -> TensorConfig:
        min_mean, min_p05 = BASELINE_THRESHOLDS[kind]
        return TensorConfig(enabled=True, strip_dense=opts.strip_dense, K=opts.kind_K(kind), block=opts.block,
                            min_mean=min_mean, min_p05=min_p05)
    return resolve


def clamp_K(opts: BuildOptions, n_in_by_kind: dict[str, int]) -> BuildOptions:
    """`opts` with every budget flag lowered to the widest input of the weights it applies to: the K that
    is actually used, for the file's global keys and the report (a row cannot keep more than n_in entries)."""
    if not n_in_by_kind:
        return opts
    widest = max(n_in_by_kind.values())

    def used(kind: str, flag: int) -> int:
        n_in = n_in_by_kind.get(kind)
        if n_in is not None and opts.kind_K(kind) > n_in:
            return n_in
        return min(flag, widest) if flag > 0 else flag  # -1 (follow --K) stays -1

    return replace(opts, K=min(opts.K, widest), K_gate=used("ffn_gate", opts.K_gate), K_up=used("ffn_up", opts.K_up),
                   K_down=used("ffn_down", opts.K_down))


def tensor_seed(seed: int, layer: int, kind: str, stream: int = 0) -> int:
    """A 32-bit seed for (layer, kind, stream) derived from --seed only."""
    ss = np.random.SeedSequence([seed % (1 << 32), layer, KINDS.index(kind), stream])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def validate_encoding(opts: BuildOptions) -> None:
    """The encoding flags (what `build` and `sweep` share), without any path: one line per problem."""
    if opts.scheme not in ("coo", "block"):
        raise SeedDeltaError(f"--scheme must be coo or block, got {opts.scheme!r}")
    if opts.scheme == "block" and not 1 <= opts.block <= 4096:
        raise SeedDeltaError(f"--block must be in 1..4096 for scheme block, got {opts.block}")
    if opts.block <= 0:
        raise SeedDeltaError(f"--block must be positive, got {opts.block}")
    spec = opts.variant_spec()
    problem = spec.problem()
    if problem is not None:
        raise SeedDeltaError(f"--variant {opts.variant}: {problem}")
    k_min = 0 if spec.is_variant else 1  # variant sdq: K 0 is the quantized base alone
    if opts.K < k_min:
        raise SeedDeltaError(f"--K must be a positive integer{' or 0' if k_min == 0 else ''}, got {opts.K}")
    for flag, value in (("--K-gate", opts.K_gate), ("--K-up", opts.K_up), ("--K-down", opts.K_down)):
        if value < k_min and value != -1:
            raise SeedDeltaError(f"{flag} must be a positive integer (or -1 for --K), got {value}")
    if spec.is_variant:
        if opts.scheme != "coo":
            raise SeedDeltaError(f"--variant {opts.variant} stores its own residual (--coding); --scheme block does "
                                 "not apply")
        if opts.base:
            raise SeedDeltaError(f"--variant {opts.variant} has a quantized base; --base (XOR-circulant) does not apply")
    if spec.is_variant and (spec.refit == "full" or spec.quantizer == "gptq") and opts.xtx is None:
        raise SeedDeltaError(f"{'--refit full' if spec.refit == 'full' else '--quantizer gptq'} needs the calibration "
                             "activations' XᵀX: --xtx FILE (seeddelta imatrix --xtx)")
    if opts.idx_type not in ("i16", "i32"):
        raise SeedDeltaError(f"--idx-type must be i16 or i32, got {opts.idx_type!r}")
    if opts.val_type not in ("f16", "f32"):
        raise SeedDeltaError(f"--val-type must be f16 or f32, got {opts.val_type!r}")
    if opts.eval_cols < 0 or opts.eval_x < 0:
        raise SeedDeltaError("--eval-cols and --eval-x must be >= 0")
    for flag, fvalue in (("--imatrix-eps", opts.imatrix_eps), ("--imatrix-power", opts.imatrix_power),
                         ("--delta-norm-clamp-down", opts.delta_norm_clamp_down),
                         ("--delta-norm-clamp-gate", opts.delta_norm_clamp_gate),
                         ("--dense-rows-down", opts.dense_rows_down)):
        if not np.isfinite(fvalue):
            raise SeedDeltaError(f"{flag} must be a finite number, got {fvalue}")
    if opts.delta_norm_clamp_down < 0:
        raise SeedDeltaError(f"--delta-norm-clamp-down must be >= 0, got {opts.delta_norm_clamp_down}")
    if opts.delta_norm_clamp_gate < 0:
        raise SeedDeltaError(f"--delta-norm-clamp-gate must be >= 0, got {opts.delta_norm_clamp_gate}")
    if not 0 <= opts.dense_rows_down <= 1:
        raise SeedDeltaError(f"--dense-rows-down must be in [0, 1], got {opts.dense_rows_down}")
    if opts.threads < 0:
        raise SeedDeltaError(f"-t must be >= 0 (0: automatic, one per core), got {opts.threads}")


def validate_options(opts: BuildOptions) -> None:
    validate_encoding(opts)
    if not opts.output:
        raise SeedDeltaError("-o/--output is required")
    if same_file(opts.input, opts.output):
        raise SeedDeltaError(f"-o {opts.output} is the input file; the input is never overwritten, choose another -o")
    out_dir = os.path.dirname(os.path.abspath(opts.output))
    if not os.path.isdir(out_dir):
        raise SeedDeltaError(f"output directory does not exist: {out_dir}")
    if not os.access(out_dir, os.W_OK):
        raise SeedDeltaError(f"output directory is not writable: {out_dir}")
    if opts.report_json is not None:
        if same_file(opts.report_json, opts.output):
            raise SeedDeltaError(f"--report-json {opts.report_json} is the -o output; give the report its own file")
        for flag, path in (("-i", opts.input), ("--imatrix", opts.imatrix), ("--policy", opts.policy),
                           ("--xtx", opts.xtx), ("--quant-base-from", opts.quant_base_from)):
            if path is not None and same_file(opts.report_json, path):
                raise SeedDeltaError(f"--report-json {opts.report_json} is the input {flag} {path}; inputs are "
                                     "never overwritten, choose another --report-json")
        if not os.path.isdir(os.path.dirname(os.path.abspath(opts.report_json))):
            raise SeedDeltaError(f"report directory does not exist: {os.path.dirname(os.path.abspath(opts.report_json))}")
    for flag, path in (("--imatrix", opts.imatrix), ("--policy", opts.policy), ("--xtx", opts.xtx),
                       ("--quant-base-from", opts.quant_base_from)):
        if path is not None and same_file(opts.output, path):
            raise SeedDeltaError(f"-o {opts.output} is the input {flag} {path}; inputs are never overwritten, "
                                 "choose another -o")
    for flag, path in (("--report-json", opts.report_json), ("--policy-export", opts.policy_export)):
        if path is None:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise SeedDeltaError(f"{flag}: directory does not exist: {directory}")
        if same_file(opts.input, path):
            raise SeedDeltaError(f"{flag} {path} is the input file; the input is never overwritten")
    if opts.policy_export is not None and opts.policy is not None and same_file(opts.policy, opts.policy_export):
        raise SeedDeltaError(f"--policy-export {opts.policy_export} is the policy being read; choose another path")
    if opts.policy_export is not None and same_file(opts.output, opts.policy_export):
        raise SeedDeltaError(f"--policy-export {opts.policy_export} is the output GGUF; choose another path")
    if math.isnan(opts.stack_cost_cap) or opts.stack_cost_cap < 0:
        raise SeedDeltaError(f"--stack-cost-cap must be a number >= 0, got {opts.stack_cost_cap}")
