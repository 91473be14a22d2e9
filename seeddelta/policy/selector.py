"""Layer selectors of `ranges[i].layers`: `"8-20,24"`, `"3-1,2,2,5"`, `"13"`.

Same grammar as the CLI's `--layers` lists (seeddelta.layers): comma-separated tokens, each a
layer `N` or an inclusive range `A-B` (reversed bounds are swapped, spaces around numbers are
allowed); the selected layers are sorted and de-duplicated. Kept as intervals so a selector is
checked without a model (the model's layer count is checked when resolving).

Stricter than the original, which ignored empty tokens and read `"12abc"` as 12: a token that is
not a number or a range, an empty token (`"1,,2"`), an empty selector and a layer id above
MAX_LAYER_ID are errors here.
"""

from __future__ import annotations

import re

from seeddelta.policy.schema import MAX_LAYER_ID

_TOKEN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_selector(text: str) -> tuple[tuple[int, int], ...]:
    """Inclusive (lo, hi) intervals of a selector, in the order written. Raises ValueError."""
    if not text.strip():
        raise ValueError("empty layer selector (expected e.g. \"8-20,24\")")
    intervals: list[tuple[int, int]] = []
    for token in text.split(","):
        match = _TOKEN.match(token)
        if match is None:
            what = "an empty item" if not token.strip() else repr(token.strip())
            raise ValueError(f"cannot parse {what} in layer selector {text!r} (expected N, A-B or a list like 8-20,24)")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        lo, hi = min(lo, hi), max(lo, hi)
        if hi > MAX_LAYER_ID:
            raise ValueError(f"layer {hi} in selector {text!r} is not a layer id (at most {MAX_LAYER_ID})")
        intervals.append((lo, hi))
    return tuple(intervals)


def selector_layers(intervals: tuple[tuple[int, int], ...]) -> list[int]:
    """The sorted, de-duplicated layers the intervals select."""
    return sorted({layer for lo, hi in intervals for layer in range(lo, hi + 1)})
