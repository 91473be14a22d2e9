"""Layer selections for `--layers`: all layers, an inclusive range `A-B`, or a list like `3,5,8-10`.

The original accepted only `A-B` (swapping A > B and silently clamping to the model). We accept
the original's form plus comma-separated lists of single layers and ranges; a reversed range
`B-A` keeps the original's meaning (A to B) but says so; anything outside `[0, n_layer - 1]` is
refused with a message naming the layer instead of being clamped away, and an empty selection
(`--layers ""`) is an error (omit the flag for every layer).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from seeddelta.errors import SeedDeltaError

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: str | None, n_layer: int, note: Callable[[str], None] | None = None) -> list[int]:
    """Sorted, de-duplicated layer indices selected by `spec` (None: every layer); `note` hears warnings."""
    if n_layer <= 0:
        raise SeedDeltaError("the model has no layers (no blk.N.* tensors)")
    if spec is None:
        return list(range(n_layer))
    if not spec.strip():
        raise SeedDeltaError(f"--layers {spec!r} selects no layer (omit --layers for every layer)")
    selected: set[int] = set()
    for raw in spec.split(","):
        match = _ITEM.match(raw)
        if match is None:
            raise SeedDeltaError(
                f"--layers {spec!r}: cannot parse {raw.strip()!r} (expected N, A-B or a list like 3,5,8-10)"
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if lo > hi:
            if note is not None:
                note(f"--layers {raw.strip()!r} is a reversed range; read as {hi}-{lo} (layers {hi} to {lo})")
            lo, hi = hi, lo
        for layer in (lo, hi):
            if layer >= n_layer:
                raise SeedDeltaError(
                    f"--layers {spec!r}: layer {layer} is outside the model (layers 0-{n_layer - 1})"
                )
        selected.update(range(lo, hi + 1))
    return sorted(selected)


def format_layers(layers: list[int]) -> str:
    """Compact text of a layer list, e.g. [3, 5, 8, 9, 10] -> '3,5,8-10' (inverse of parse_layers)."""
    parts: list[str] = []
    run: list[int] = []
    for layer in sorted(set(layers)):
        if run and layer == run[-1] + 1:
            run.append(layer)
            continue
        if run:
            parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [layer]
    if run:
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(parts)
