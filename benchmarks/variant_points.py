"""Equal-bytes points of the SeedΔ variants against quantization (issue 13's figures).

Not a timing benchmark: it makes one GGUF per candidate (only FFN weights differ from the original),
measures it with one evaluator — `kl_divergence` against the original's logits on the same windows
(KLD mean, same top-1, paired ΔNLL → ΔPPL %) — and counts the FFN bytes from the file (every stored
tensor of an FFN weight: dense and SeedΔ/variant tensors; alignment padding not counted). Results are
appended to a JSON-lines file and skipped when already there (same label), so a long run resumes.

Candidates are written `label=FLAGS`, FLAGS being `seeddelta build` flags (`-i`, `-o`, `--strip-dense`
and `-q` are added) or `original`. A stock llama.cpp quantization of the FFN weights is the variant sdq
with `--quant-base-from THAT_FILE --K 0`: the FFN tensors are that file's bytes, unchanged.

    python -m benchmarks.variant_points --model M.gguf --text EVAL.txt --out points.jsonl \
        --ctx 512 --chunks 12 [--greedy] [--ppl-ctx 1024,2048] 'Q4_0 rtn=--variant sdq --K 0' ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from seeddelta.resources import prepare_environment

prepare_environment()  # before torch: idle OpenMP threads sleep (a busy machine otherwise slows every forward)

import torch  # noqa: E402


def ffn_bits(path: str) -> tuple[int, int]:
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.schema import KINDS, parse_seeddelta_name, weight_name

    m = GGUFModel(path, what="model")
    weights = sum(a * b for layer in range(m.n_layer) for kind in KINDS for a, b in [m.weight_dims(layer, kind)])
    dense = {weight_name(layer, kind) for layer in range(m.n_layer) for kind in KINDS}
    nbytes = sum(m.tensor_nbytes(n) for n in m.tensors if n in dense or parse_seeddelta_name(n) is not None)
    return nbytes, weights


class CachedLogits:
    """The original's scored logits per window, computed once."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, window: np.ndarray, first: int) -> torch.Tensor:
        key = hash(window.tobytes())
        if key not in self.cache:
            self.cache[key] = self.model.forward(window, logits_start=first)[:-1].clone()
        return self.cache[key]


def main(argv: list[str] | None = None) -> int:
    from seeddelta.cli import main as cli
    from seeddelta.evaluation.greedy import DEFAULT_TOLERANCE, run_pack, verdict
    from seeddelta.evaluation.pack import load_pack
    from seeddelta.evaluation.scoring import kl_divergence, model_logits
    from seeddelta.evaluation.windows import text_windows
    from seeddelta.runtime.model import load_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default=None, help="directory for the candidate files (default: next to --out)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--ppl-ctx", default="", help="extra contexts for paired ΔPPL, e.g. 1024,2048")
    p.add_argument("--greedy", action="store_true", help="run the tiny greedy pack too")
    p.add_argument("--keep", action="store_true", help="keep the candidate files")
    p.add_argument("--mode", default="materialized", choices=("materialized", "sparse"))
    p.add_argument("candidates", nargs="+", metavar="LABEL=FLAGS")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent
    work.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(line)["label"] for line in out.read_text().splitlines() if line.strip()}
    tok = load_tokenizer(args.model)
    base = load_model(args.model, use_seeddelta=False)
    extra = [int(c) for c in args.ppl_ctx.split(",") if c.strip()]
    wins = {c: text_windows(Path(args.text), c, args.chunks, tok).windows for c in [args.ctx, *extra]}
    base_fns = {c: CachedLogits(base) for c in wins}
    base_pack = run_pack(base, tok, load_pack()) if args.greedy else None
    for spec in args.candidates:
        label, _, flags = spec.partition("=")
        if label in done:
            continue
        t0 = time.perf_counter()
        if flags.strip() == "original":
            path = args.model
        else:
            path = str(work / (label.replace(" ", "_").replace("/", "-") + ".gguf"))
            rc = cli(["build", "-i", args.model, "-o", path, "--strip-dense", "-q", *shlex.split(flags)])
            if rc != 0:
                print(f"{label}: build failed ({rc})", file=sys.stderr)
                continue
        build_s = time.perf_counter() - t0
        nbytes, weights = ffn_bits(path)
        model = load_model(path, mode=args.mode)
        row: dict[str, Any] = {"label": label, "flags": flags, "ffn_bytes": nbytes, "ffn_weights": weights,
                               "bits_per_weight": 8.0 * nbytes / weights, "file_bytes": os.path.getsize(path),
                               "build_seconds": build_s}
        for c, w in wins.items():
            s = kl_divergence(base_fns[c], model_logits(model), w).summary()
            d, se = s["delta_nll"]["mean"], s["delta_nll"]["se"]
            key = "" if c == args.ctx else f"_ctx{c}"
            row.update({f"kld{key}": s["kld"]["mean"], f"kld_se{key}": s["kld"]["se"], f"kld_p99{key}": s["kld"]["p99"],
                        f"same_top{key}": s["same_top_p"]["mean"], f"delta_nll{key}": d, f"delta_nll_se{key}": se,
                        f"delta_ppl_pct{key}": 100 * math.expm1(d), f"ppl{key}": s["ppl_model"]["ppl"],
                        f"ppl_base{key}": s["ppl_base"]["ppl"], f"n_tokens{key}": s["n_tokens"]})
        if base_pack is not None:
            r = run_pack(model, tok, load_pack())
            v = verdict(r, base_pack, DEFAULT_TOLERANCE)
            row.update({"greedy_accuracy": r["accuracy"], "greedy_flagged": r["flagged"],
                        "greedy_base_accuracy": base_pack["accuracy"], "greedy_verdict": v["result"]})
        row["seconds"] = time.perf_counter() - t0
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{label}: {row['bits_per_weight']:.3f} bpw  KLD {row['kld']:.5f}  ΔPPL {row['delta_ppl_pct']:+.2f}%  "
              f"({row['seconds']:.0f}s)", flush=True)
        del model
        if path != args.model and not args.keep:
            os.unlink(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
