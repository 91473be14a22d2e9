"""`seeddelta materialize IN.gguf -o OUT.gguf`: a SeedΔ file rewritten for stock llama.cpp.

Every SeedΔ weight becomes a dense `blk.N.<kind>.weight` holding exactly the values the torch
runtime's materialized mode multiplies (F32 for an F32 model, F16 otherwise); every other tensor and
key is copied as stored; SeedΔ tensors and `seeddelta.*` keys are dropped."""

from __future__ import annotations

import argparse

from seeddelta.commands.common import Subparsers, add_input, add_output, describe


def register(sub: Subparsers) -> None:
    p = sub.add_parser("materialize", help="rewrite a SeedΔ GGUF as a dense one that stock llama.cpp runs",
                       description=describe(__doc__))
    add_input(p, "input", metavar="IN.gguf", help="GGUF with SeedΔ tensors")
    add_output(p, "-o", "--output", required=True, metavar="OUT.gguf", help="dense GGUF to write")
    p.add_argument("--no-seeddelta", dest="use_seeddelta", action="store_false",
                   help="drop the SeedΔ tensors and keep the dense weights instead (fails on stripped files)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seeddelta.runtime.materialize import materialize_file

    res = materialize_file(args.input, args.output, use_seeddelta=bool(args.use_seeddelta))
    print(f"wrote {args.output}: {res.weights} SeedΔ weight(s) written dense, {res.dropped_tensors} tensor(s) and "
          f"{res.dropped_keys} seeddelta.* key(s) dropped; {res.output_bytes} B")
    return 0
