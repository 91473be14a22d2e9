"""Opt-in, versioned extensions of the SeedΔ file schema.

A file that uses an extension lists it in the global string array `seeddelta.extensions`
("name/version"). A reader runs a file only when it knows every extension listed; otherwise it
refuses it with one line naming the extension — never runs it as if the extension were absent,
which would compute a different function without a word. A file whose tensors belong to an
extension it does not declare is refused the same way.

Known extensions:

* ``dense_rows/1`` — partial strip (`codec.partial`): per weight, `dr_idx` (I32, (R,)) lists output
  rows computed from `dr_val` (F16/F32, (R, n_in)), the original rows, instead of from SeedΔ.
* ``delta_regime/1`` — conditional Δ (`codec.regime`): per weight, `rg_stat` (I32, (1,)) and `rg_lim`
  (F32, (2,)) declare the regime of a per-token input statistic inside which Δ is applied; outside it
  the weight computes its base alone.

The original C++ runtime knows no extension: it refuses such a file at load ("wrong number of
tensors": the extra tensors are not claimed by its model), see docs/file-format.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from seeddelta.errors import SeedDeltaError

EXTENSIONS_KEY = "seeddelta.extensions"
# extension -> the tensor suffixes it adds
KNOWN: Mapping[str, tuple[str, ...]] = {"dense_rows/1": ("dr_idx", "dr_val"), "delta_regime/1": ("rg_stat", "rg_lim")}
EXTENSION_OF_SUFFIX: Mapping[str, str] = {s: name for name, sufs in KNOWN.items() for s in sufs}


def declared(value: object, where: str) -> tuple[str, ...]:
    """The extensions a file declares (its `seeddelta.extensions` value; None: none)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise SeedDeltaError(f"{where}: {EXTENSIONS_KEY} must be an array of strings, got {value!r}")
    return tuple(value)


def check_extensions(value: object, suffixes: Iterable[str], where: str,
                     known: Mapping[str, tuple[str, ...]] = KNOWN) -> tuple[str, ...]:
    """Refuse (one line) a file that declares an extension this reader does not know, or holds tensors
    of an extension it does not declare. Returns the declared extensions."""
    names = declared(value, where)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SeedDeltaError(f"{where}: uses SeedΔ file extension {unknown[0]!r}, which this reader does not know "
                             f"(it knows: {', '.join(sorted(known)) or 'none'}); refusing to run it without it")
    for suffix in sorted(set(suffixes)):
        ext = EXTENSION_OF_SUFFIX.get(suffix)
        if ext is not None and ext not in names:
            raise SeedDeltaError(f"{where}: holds {suffix} tensors of SeedΔ extension {ext!r} but does not declare it "
                                 f"in {EXTENSIONS_KEY}")
    return names
