"""Run every benchmark module in turn: `python -m benchmarks [name ...]`."""

from __future__ import annotations

import importlib
import sys

MODULES = ("bench_codec", "bench_build", "bench_build_compare", "bench_large", "bench_runtime", "bench_threads",
           "bench_variants", "bench_workers")


def main(argv: list[str]) -> int:
    from seeddelta.resources import prepare_environment

    prepare_environment()  # as the CLI does, before a benchmark imports torch
    names = argv or list(MODULES)
    status = 0
    for name in names:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            print(f"[{name}] not available: {exc}")
            continue
        print(f"=== {name} ===", flush=True)
        status |= int(module.main() or 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
