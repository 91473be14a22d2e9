"""Options the commands share, and the one place that turns them into library arguments.

argparse lives only under `seeddelta.commands`; everything below takes typed values. Registering
a command needs nothing but argparse: heavy modules (torch, the runtime, the builder) are imported
inside the functions that use them, so `seeddelta --help` answers at once.

Every path a command reads is declared with `add_input` and every path it writes with `add_output`
(or `add_output_dir`); `guard_paths` — run by `seeddelta.cli` before the command — refuses an
output that would replace an input or another output, or that cannot be written, before any work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seeddelta.assets import TINY_MODEL, TINY_VAL_TEXT
from seeddelta.runtime.engines import DEFAULT_CTX, ENGINES

if TYPE_CHECKING:
    from seeddelta.builder.options import BuildOptions
    from seeddelta.evaluation.memory import Loaded
    from seeddelta.evaluation.windows import TextWindows
    from seeddelta.evaluation.workers import Pool
    from seeddelta.runtime.tokenizers import Tokenizer

Subparsers = argparse._SubParsersAction  # type: ignore[type-arg]

# dest names under which a parser records its declared paths: (dest, flag, path used when omitted)
INPUTS, OUTPUTS, OUT_DIRS = "_inputs", "_outputs", "_out_dirs"


def describe(doc: str | None) -> str | None:
    """A command's description: the first paragraph of its module docstring, without its "`seeddelta X`: " label."""
    if not doc:
        return None
    text = doc.split("\n\n")[0].replace("\n", " ")
    if text.startswith("`seeddelta ") and "`: " in text:
        text = text.split("`: ", 1)[1]
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------- declared paths
def _declare(p: argparse.ArgumentParser, role: str, action: argparse.Action, implied: Path | None) -> None:
    flag = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
    entry = (action.dest, str(flag), None if implied is None else str(implied))
    p.set_defaults(**{role: (*(p.get_default(role) or ()), entry)})


def add_input(p: argparse.ArgumentParser, *flags: str, implied: Path | None = None,
              group: Any = None, **kw: Any) -> None:
    """A path the command reads (`implied`: the file used when the flag is omitted; `group`: a mutually
    exclusive group of `p` to add the flag to)."""
    _declare(p, INPUTS, (group or p).add_argument(*flags, **kw), implied)


def add_output(p: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    """A file the command writes (atomically)."""
    _declare(p, OUTPUTS, p.add_argument(*flags, **kw), None)


def add_output_dir(p: argparse.ArgumentParser, *flags: str, **kw: Any) -> None:
    """A directory the command writes into (created when missing)."""
    _declare(p, OUT_DIRS, p.add_argument(*flags, **kw), None)


def declared_paths(args: argparse.Namespace, role: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for dest, flag, implied in getattr(args, role, ()) or ():
        value = getattr(args, dest, None)
        out.append((flag, str(value) if value not in (None, "") else implied))
    return out


def guard_paths(args: argparse.Namespace) -> None:
    """Check the command's declared outputs against its inputs and each other, before any work."""
    from seeddelta.outputs import check_paths, stderr_note

    check_paths(declared_paths(args, INPUTS), declared_paths(args, OUTPUTS), declared_paths(args, OUT_DIRS),
                note=stderr_note)


# ---------------------------------------------------------------------------------- numbers
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def chunks_int(text: str) -> int:
    """argparse type of --chunks: N >= 1 windows at most, any negative number: all; 0 is refused."""
    value = _int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 would score nothing (use -1, the default, for all windows)")
    return value


def layers_arg(text: str) -> str:
    """argparse type of --layers: the syntax of `seeddelta.layers.parse_layers` (the range needs the model)."""
    import re

    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} selects no layer (omit --layers for every layer)")
    for item in text.split(","):
        if re.fullmatch(r"\s*\d+\s*(-\s*\d+\s*)?", item) is None:
            raise argparse.ArgumentTypeError(f"cannot parse {item.strip()!r} in {text!r} (expected N, A-B or a list "
                                             "like 3,5,8-10)")
    return text


def finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


# ---------------------------------------------------------------------------------- model and text
def add_model_arg(p: argparse.ArgumentParser, what: str = "GGUF model") -> None:
    add_input(p, "-m", "--model", default=None, metavar="FILE", implied=TINY_MODEL,
              help=f"{what} (default: the tiny model)")


def model_path(args: argparse.Namespace) -> Path:
    """-m, or the built-in tiny model."""
    from seeddelta.assets import tiny_model

    return Path(args.model) if args.model else tiny_model()


def add_text_args(p: argparse.ArgumentParser, text_help: str = "UTF-8 text") -> None:
    """-f/-c/--chunks (llama-perplexity's flags)."""
    add_input(p, "-f", "--file", default=None, metavar="TEXT", implied=TINY_VAL_TEXT,
              help=f"{text_help} (default: the tiny model's validation text)")
    p.add_argument("-c", "--ctx-size", dest="ctx", type=positive_int, default=512, metavar="N",
                   help="window size n_ctx in tokens (512; a warning when beyond the model's training context)")
    p.add_argument("--chunks", type=chunks_int, default=-1, metavar="N",
                   help="at most N windows (default -1: all; any negative number means all, 0 is an error)")


def windows_from_args(args: argparse.Namespace, tokenizer: Tokenizer, n_ctx_train: int | None = None) -> TextWindows:
    """The text named by -f (or the built-in one) cut into the windows -c/--chunks describe."""
    from seeddelta.assets import tiny_val_text
    from seeddelta.evaluation.windows import text_windows

    windows = text_windows(Path(args.file) if args.file else tiny_val_text(), args.ctx, args.chunks, tokenizer)
    # warned only once the text is usable, so a refused input stays one line
    if n_ctx_train and args.ctx > n_ctx_train:
        warn(f"-c {args.ctx} is beyond the model's training context ({n_ctx_train} tokens): positions past it "
             "are outside what the model was trained on")
    return windows


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- runtime
def add_runtime_args(p: argparse.ArgumentParser, *, engines: bool = True) -> None:
    """Options shared by ppl, kld, greedy and imatrix (`--engine` where llama.cpp can do the job)."""
    p.add_argument("--sparse", action="store_true",
                   help="evaluate SeedΔ projections without building dense weights (default: materialized)")
    p.add_argument("--no-seeddelta", dest="use_seeddelta", action="store_false",
                   help="ignore SeedΔ tensors and run the dense weights (fails on stripped files)")
    add_threads_arg(p)
    add_quiet_arg(p)
    if engines:
        add_engine_arg(p)




def add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch (our runtime) or llama.cpp (stock llama.cpp via llama-cpp-python, extra `interop`; "
                        "SeedΔ files are materialized for it)")


THREADS_HELP = ("threads for the computation (default 0: automatic — every core, with idle threads sleeping "
                "instead of spinning, so a busy machine does not slow the run down)")


def add_threads_arg(p: argparse.ArgumentParser, help_text: str = THREADS_HELP) -> None:
    p.add_argument("-t", "--threads", type=nonnegative_int, default=0, metavar="N", help=help_text)


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display on stderr")


def add_jobs_args(p: argparse.ArgumentParser) -> None:
    """-j/--jobs and --scheduler: where independent units run (`seeddelta.evaluation.workers`)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("-j", "--jobs", type=positive_int, default=1, metavar="N",
                       help="measure N units at a time in N worker processes (1: in this process). Each process "
                            "loads its own copy of the model; without -t each uses cores/N threads, so N processes "
                            "never ask for more threads than the machine has")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the units on the Dask cluster whose scheduler is at ADDRESS (e.g. tcp://host:8786; "
                            "optional extra: pip install 'seeddelta[cluster]'); its workers read the model and "
                            "every input file at the same absolute paths")


def pool_from_args(args: argparse.Namespace) -> Pool:
    """The `Pool` -j/--scheduler/-t describe; a --scheduler that cannot be reached (or Dask missing) is one
    line now, before any work."""
    from seeddelta.evaluation.workers import Pool, dask_client

    pool = Pool(jobs=int(getattr(args, "jobs", 1) or 1), scheduler=getattr(args, "scheduler", None),
                threads=int(getattr(args, "threads", 0) or 0))
    if pool.scheduler is not None:
        dask_client(pool.scheduler).close()
    return pool


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's intra-op threads from -t (0: automatic, see `seeddelta.resources`); returns the count."""
    from seeddelta.resources import configure

    return configure(int(getattr(args, "threads", 0) or 0))


def conditional_delta(model: Any) -> dict[str, Any]:
    """{"conditional_delta": compute saved} when the model has weights with a delta regime (extension
    delta_regime/1), else {} — for a command's JSON output (a llama.cpp model has none)."""
    fn = getattr(model, "conditional_delta", None)
    saved = fn() if fn is not None else None
    if saved is None:
        return {}
    print(f"conditional Δ: {saved['pairs_skipped']} of {saved['pairs']} (token, tensor) pairs skipped Δ "
          f"({100 * saved['pairs_skipped_fraction']:.1f} %), {100 * saved['ffn_flops_skipped_fraction']:.2f} % of the "
          "dense FFN FLOPs", file=sys.stderr)
    return {"conditional_delta": saved}


def load_from_args(args: argparse.Namespace, path: str | Path, *, use_seeddelta: bool | None = None) -> Loaded:
    """The model at `path` on the engine the options name (`use_seeddelta` overrides --no-seeddelta)."""
    from seeddelta.evaluation.memory import load

    return load(path, use_seeddelta=bool(args.use_seeddelta if use_seeddelta is None else use_seeddelta),
                mode="sparse" if args.sparse else "materialized", engine=getattr(args, "engine", "torch"),
                n_ctx=getattr(args, "ctx", DEFAULT_CTX), threads=getattr(args, "threads", 0))


# ---------------------------------------------------------------------------------- progress
Step = Callable[..., None]  # step(n=1, info=None): n more done; info shown after the bar (e.g. a running PPL)


@contextmanager
def progress(args: argparse.Namespace, total: int, desc: str, unit: str = "it") -> Iterator[Step]:
    """A tqdm bar on stderr (none with -q or when stderr is not a terminal); yields its `step`.

    The bar is closed on every exit, Ctrl-C included, so the next line starts on a line of its own."""
    from tqdm import tqdm

    quiet = bool(getattr(args, "quiet", False))
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True,
               disable=True if quiet else None)

    def step(n: int = 1, info: str | None = None) -> None:
        if info is not None:
            bar.set_postfix_str(info, refresh=False)
        bar.update(n)

    try:
        yield step
    finally:
        bar.close()


def progress_note(args: argparse.Namespace) -> Callable[[str], None]:
    """A line on stderr that does not break a progress bar (silent with -q)."""
    from tqdm import tqdm

    def note(message: str) -> None:
        if not getattr(args, "quiet", False):
            tqdm.write(message, file=sys.stderr)

    return note


# ---------------------------------------------------------------------------------- encoding
def k_list(text: str) -> tuple[int, ...]:
    """'16,32,64' -> (16, 32, 64): budgets to try, in the order given."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return tuple(dict.fromkeys(values))


def add_encoding_args(p: argparse.ArgumentParser, *, several_K: bool = False) -> None:
    """How each weight is encoded: the flags `build` and `sweep` share (the original's names and defaults).
    `several_K`: --K and --K-<kind> take comma-separated lists (scan)."""
    p.add_argument("--scheme", choices=("coo", "block"), default="coo", help="residual encoding (default coo)")
    p.add_argument("--block", type=int, default=32, metavar="N", help="block size for scheme block, 1..4096 (32)")
    if several_K:
        p.add_argument("--K", type=k_list, default=(32,), metavar="N[,N...]",
                       help="residual budgets per output row to measure, e.g. 16,32,64 (32)")
        for kind in ("gate", "up", "down"):
            p.add_argument(f"--K-{kind}", dest=f"K_{kind}", type=k_list, default=(), metavar="N[,N...]",
                           help=f"budgets for ffn_{kind} (default: --K)")
    else:
        p.add_argument("--K", type=int, default=32, metavar="N",
                       help="residual budget per output row (32); above a weight's n_in it is clamped with a warning")
        p.add_argument("--K-gate", dest="K_gate", type=int, default=-1, metavar="N", help="budget for ffn_gate (-1: --K)")
        p.add_argument("--K-up", dest="K_up", type=int, default=-1, metavar="N", help="budget for ffn_up (-1: --K)")
        p.add_argument("--K-down", dest="K_down", type=int, default=-1, metavar="N",
                       help="budget for ffn_down (-1: --K)")
    p.add_argument("--idx-type", choices=("i16", "i32"), default="i16", help="index dtype (i16; i32 automatically "
                   "with a warning when n_in > 32768)")
    p.add_argument("--val-type", choices=("f16", "f32"), default="f16", help="residual value dtype (f16)")
    p.add_argument("--row-scale", action=argparse.BooleanOptionalAction, default=False,
                   help="write the least-squares per-row scale d_row_scale (off)")
    add_input(p, "--imatrix", default=None, metavar="FILE", help="importance matrix (llama-imatrix GGUF or legacy)")
    p.add_argument("--imatrix-eps", type=float, default=1e-8, metavar="F", help="floor before the power (1e-8)")
    p.add_argument("--imatrix-power", type=float, default=1.0, metavar="F", help="scale = imat^(power/2) (1.0)")
    p.add_argument("--base", action="store_true", help="fit and write the XOR-circulant base W0")
    p.add_argument("--base-max-samples", type=int, default=2048, metavar="N",
                   help="rows sampled per block for the base fit, <= 0: all (2048)")
    p.add_argument("--base-perm-trials", type=int, default=1, metavar="N",
                   help="permutation trials per block: identity + N-1 random (1)")
    p.add_argument("--seed", type=int, default=1234, metavar="N", help="seed (1234)")
    p.add_argument("--delta-norm-clamp-down", type=float, default=0.0, metavar="F",
                   help="clamp ||Δ|| of ffn_down to F·||W||_F (0: off)")
    add_threads_arg(p, "worker threads (default 0: automatic, one per core)")
    add_variant_args(p)


def add_variant_args(p: argparse.ArgumentParser) -> None:
    """SeedΔ variants (ours, opt-in; docs/file-format.md "Variants"): files the original cannot load."""
    g = p.add_argument_group("SeedΔ variant sdq (residual over a quantized base; not loadable by the original)")
    g.add_argument("--variant", choices=("none", "sdq"), default="none",
                   help="none: plain SeedΔ (default); sdq: W0 = the weight in a ggml quantization type, Δ = the "
                        "K largest imatrix-weighted entries per row of its error (--K 0: the base alone)")
    g.add_argument("--quant-base", default="Q4_0", metavar="TYPE",
                   help="ggml type of the sdq base, quantized by gguf-py: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, MXFP4, F16 "
                        "(Q4_0)")
    add_input(p, "--quant-base-from", group=g, default=None, metavar="FILE.gguf",
              help="take the sdq base from this GGUF's FFN weights as stored (e.g. llama-quantize's K-quants)")
    g.add_argument("--quantizer", choices=("rtn", "gptq"), default="rtn",
                   help="sdq base: rtn (gguf-py's round-to-nearest) or gptq (error feedback on --xtx; Q8_0, Q4_0, "
                        "MXFP4)")
    g.add_argument("--rotate", action="store_true",
                   help="random-sign block Walsh–Hadamard rotation of the rows before quantizing the base")
    g.add_argument("--holdout", action="store_true",
                   help="keep each row's K largest |w|·s entries out of the base's quantization (SpQR-style)")
    g.add_argument("--coding", choices=("coo", "c8"), default="coo",
                   help="sdq residual: coo (i16 index + f16 value) or c8 (byte offset + int8 value, per-row step)")
    g.add_argument("--refit", choices=("none", "full"), default="none",
                   help="sdq residual values: none (the error itself) or full (least squares on --xtx)")
    add_input(p, "--xtx", group=g, default=None, metavar="XTX.gguf",
              help="calibration Σ x xᵀ per FFN input (seeddelta imatrix --xtx), for --refit full")


ENCODING_FIELDS = ("scheme", "block", "K", "K_gate", "K_up", "K_down", "idx_type", "val_type", "row_scale", "imatrix",
                   "imatrix_eps", "imatrix_power", "base", "base_max_samples", "base_perm_trials", "seed",
                   "delta_norm_clamp_down", "threads", "variant", "quant_base", "quant_base_from", "rotate",
                   "holdout", "coding", "refit", "quantizer", "xtx")


def encoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """BuildOptions fields set by `add_encoding_args`."""
    return {name: getattr(args, name) for name in ENCODING_FIELDS}


def encoding_template(args: argparse.Namespace) -> BuildOptions:
    """BuildOptions carrying only the encoding flags (input/output are filled in per unit)."""
    from seeddelta.builder.options import BuildOptions

    return BuildOptions(input="", output="", progress=False, **encoding_options(args))
