"""Storage types of SeedΔ tensors and their rounding (what is stored is what every metric sees)."""

from __future__ import annotations

import numpy as np

from seeddelta.errors import SeedDeltaError

VAL_DTYPES: dict[str, type[np.floating]] = {"f16": np.float16, "f32": np.float32}
IDX_DTYPES: dict[str, type[np.signedinteger]] = {"i16": np.int16, "i32": np.int32}
I16_MAX = int(np.iinfo(np.int16).max)


def val_dtype(name: str) -> type[np.floating]:
    try:
        return VAL_DTYPES[name]
    except KeyError:
        raise SeedDeltaError(f"unknown value type {name!r} (expected one of {sorted(VAL_DTYPES)})") from None


def idx_dtype(name: str) -> type[np.signedinteger]:
    try:
        return IDX_DTYPES[name]
    except KeyError:
        raise SeedDeltaError(f"unknown index type {name!r} (expected one of {sorted(IDX_DTYPES)})") from None


def store_values(values: np.ndarray, name: str) -> np.ndarray:
    """Round to the stored value type (round-to-nearest-even, as IEEE conversion does)."""
    return np.asarray(values).astype(val_dtype(name))


def store_indices(indices: np.ndarray, name: str) -> np.ndarray:
    dtype = idx_dtype(name)
    if indices.size and int(indices.max()) > np.iinfo(dtype).max:
        raise SeedDeltaError(f"index {int(indices.max())} does not fit {name}")
    return np.asarray(indices).astype(dtype)


def index_type_for(n_in: int, requested: str) -> tuple[str, str | None]:
    """Index type that can hold every input index, and a warning if the request had to change.

    The original silently wrote out-of-range i16 indices as -1 (dropped at runtime); we switch
    to i32 instead and say so."""
    if requested == "i16" and n_in - 1 > I16_MAX:
        return "i32", f"n_in={n_in} does not fit i16 indices; using i32"
    idx_dtype(requested)
    return requested, None
