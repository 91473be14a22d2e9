"""Options the commands share, and the one place that turns them into library arguments.

argparse lives only under `seeddelta.commands`; everything below takes typed values."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from seeddelta.assets import tiny_model, tiny_val_text
from seeddelta.builder.options import BuildOptions
from seeddelta.evaluation.memory import Loaded, load
from seeddelta.evaluation.windows import TextWindows, text_windows
from seeddelta.runtime.llama_cpp_engine import DEFAULT_CTX, ENGINES

Subparsers = argparse._SubParsersAction  # type: ignore[type-arg]


def describe(doc: str | None) -> str | None:
    """A command's description: the first paragraph of its module docstring."""
    return doc.split("\n\n")[0].replace("\n", " ") if doc else None


# ---------------------------------------------------------------------------------- model and text
def add_model_arg(p: argparse.ArgumentParser, what: str = "GGUF model") -> None:
    p.add_argument("-m", "--model", default=None, metavar="FILE", help=f"{what} (default: the tiny model)")


def model_path(args: argparse.Namespace) -> Path:
    """-m, or the built-in tiny model."""
    return Path(args.model) if args.model else tiny_model()


def add_text_args(p: argparse.ArgumentParser, text_help: str = "UTF-8 text") -> None:
    """-f/-c/--chunks (llama-perplexity's flags)."""
    p.add_argument("-f", "--file", default=None, metavar="TEXT",
                   help=f"{text_help} (default: the tiny model's validation text)")
    p.add_argument("-c", "--ctx-size", dest="ctx", type=int, default=512, metavar="N", help="window size n_ctx (512)")
    p.add_argument("--chunks", type=int, default=-1, metavar="N", help="at most N windows (-1: all)")


def windows_from_args(args: argparse.Namespace, tokenizer: Any) -> TextWindows:
    """The text named by -f (or the built-in one) cut into the windows -c/--chunks describe."""
    return text_windows(Path(args.file) if args.file else tiny_val_text(), args.ctx, args.chunks, tokenizer)


# ---------------------------------------------------------------------------------- runtime
def add_runtime_args(p: argparse.ArgumentParser, *, engines: bool = True) -> None:
    """Options shared by ppl, kld, greedy and imatrix (`--engine` where llama.cpp can do the job)."""
    p.add_argument("--sparse", action="store_true",
                   help="evaluate SeedΔ projections without building dense weights (default: materialized)")
    p.add_argument("--no-seeddelta", dest="use_seeddelta", action="store_false",
                   help="ignore SeedΔ tensors and run the dense weights (fails on stripped files)")
    add_threads_arg(p, "threads (0: torch's default; llama.cpp: every CPU)")
    if engines:
        add_engine_arg(p)


def add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch (our runtime) or llama.cpp (stock llama.cpp via llama-cpp-python, extra `interop`; "
                        "SeedΔ files are materialized for it)")


def add_threads_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("-t", "--threads", type=int, default=0, metavar="N", help=help_text)


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0) and args.threads > 0:
        torch.set_num_threads(int(args.threads))


def load_from_args(args: argparse.Namespace, path: str | Path, *, use_seeddelta: bool | None = None) -> Loaded:
    """The model at `path` on the engine the options name (`use_seeddelta` overrides --no-seeddelta)."""
    return load(path, use_seeddelta=bool(args.use_seeddelta if use_seeddelta is None else use_seeddelta),
                mode="sparse" if args.sparse else "materialized", engine=getattr(args, "engine", "torch"),
                n_ctx=getattr(args, "ctx", DEFAULT_CTX), threads=getattr(args, "threads", 0))


def chunk_printer(stream: TextIO | None = None) -> Callable[[int, float], None]:
    """llama-perplexity style running estimate: [1]x.xxxx,[2]y.yyyy,…"""
    out = stream or sys.stderr

    def show(i: int, ppl: float) -> None:
        out.write(f"[{i + 1}]{ppl:.4f},")
        out.flush()

    return show


# ---------------------------------------------------------------------------------- encoding
def add_encoding_args(p: argparse.ArgumentParser) -> None:
    """How each weight is encoded: the flags `build` and `sweep` share (the original's names and defaults)."""
    p.add_argument("--scheme", choices=("coo", "block"), default="coo", help="residual encoding (default coo)")
    p.add_argument("--block", type=int, default=32, metavar="N", help="block size for scheme block, 1..4096 (32)")
    p.add_argument("--K", type=int, default=32, metavar="N", help="residual budget per output row (32)")
    p.add_argument("--K-gate", dest="K_gate", type=int, default=-1, metavar="N", help="budget for ffn_gate (-1: --K)")
    p.add_argument("--K-up", dest="K_up", type=int, default=-1, metavar="N", help="budget for ffn_up (-1: --K)")
    p.add_argument("--K-down", dest="K_down", type=int, default=-1, metavar="N", help="budget for ffn_down (-1: --K)")
    p.add_argument("--idx-type", choices=("i16", "i32"), default="i16", help="index dtype (i16; i32 automatically "
                   "with a warning when n_in > 32768)")
    p.add_argument("--val-type", choices=("f16", "f32"), default="f16", help="residual value dtype (f16)")
    p.add_argument("--row-scale", action=argparse.BooleanOptionalAction, default=False,
                   help="write the least-squares per-row scale d_row_scale (off)")
    p.add_argument("--imatrix", default=None, metavar="FILE", help="importance matrix (llama-imatrix GGUF or legacy)")
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
    add_threads_arg(p, "worker threads (0: one per CPU)")


ENCODING_FIELDS = ("scheme", "block", "K", "K_gate", "K_up", "K_down", "idx_type", "val_type", "row_scale", "imatrix",
                   "imatrix_eps", "imatrix_power", "base", "base_max_samples", "base_perm_trials", "seed",
                   "delta_norm_clamp_down", "threads")


def encoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """BuildOptions fields set by `add_encoding_args`."""
    return {name: getattr(args, name) for name in ENCODING_FIELDS}


def encoding_template(args: argparse.Namespace) -> BuildOptions:
    """BuildOptions carrying only the encoding flags (input/output are filled in per unit)."""
    return BuildOptions(input="", output="", progress=False, **encoding_options(args))
