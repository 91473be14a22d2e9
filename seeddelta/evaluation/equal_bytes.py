"""Equal-bytes comparison: for the same FFN weights, bits per weight against KLD and ΔPPL for SeedΔ
and for what a user would pick instead — llama.cpp's own quantization types and pruning.

Every candidate is a GGUF file that differs from the original in its FFN weights only
(`blk.N.ffn_gate/ffn_up/ffn_down`), and every candidate is measured by the same evaluator on the
same windows: `kl_divergence` against the original's logits (computed once), paired ΔNLL per
token, in our torch runtime (SeedΔ files in the sparse mode, everything else dequantized by gguf-py).

**Bytes are counted from the file**: the stored bytes of every tensor of an FFN weight (its dense
tensor and its SeedΔ tensors) summed over all FFN weights; bits per weight = 8·bytes / Σ n_in·n_out.
GGUF's alignment padding (≤ 31 B per tensor) is not counted.

Families:

* ``original`` — the input itself (its own bits per weight, KLD 0);
* ``seeddelta`` — every FFN weight as SeedΔ (dense stripped, row scale on), K = density·n_in per
  kind, XOR base on/off, imatrix on/off;
* ``llama.cpp`` — stock llama.cpp's quantizer on the FFN weights (`llamacpp_quant`);
* ``variant`` — SeedΔ variant `sdq` (a residual over a quantized base, docs/file-format.md
  "Variants"): every FFN weight as the base alone (K 0) or base + a residual of density d per row,
  RTN or GPTQ base, with or without rotation, COO or compact coding, residual values as the error
  itself or refitted on the calibration XᵀX (`VARIANT_POINTS`; GPTQ and refit need `Inputs.xtx`);
* ``pruning`` — per-row magnitude or Wanda (|W|·‖x‖ with the imatrix) at the same densities,
  **dense-stored** (zeros kept, in the original's tensor type when gguf-py can write it, else F16)
  or **COO-stored** (i16 index + f16 value per kept entry: SeedΔ's COO tensors with no base and no
  row scale, which is exactly that pruning — `tests/toy/test_equal_bytes.py` holds them together).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from gguf.quants import quantize

from seeddelta.builder.options import BuildOptions
from seeddelta.builder.pipeline import run_build
from seeddelta.codec.pruning import keep_count, keep_indices, pruned
from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.llamacpp_quant import quantize_ffn, unavailable_reason
from seeddelta.evaluation.memory import load
from seeddelta.evaluation.result_cache import ResultCache
from seeddelta.evaluation.scoring import KldResult, Logits, kl_divergence, model_logits
from seeddelta.evaluation.windows import Windows
from seeddelta.gguf_format.imatrix_file import Imatrix, read_imatrix
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.schema import KINDS, parse_seeddelta_name, weight_name
from seeddelta.gguf_format.writer import RawTensor, write_model_copy

FAMILIES = ("original", "seeddelta", "variant", "llama.cpp", "pruning")
DENSITIES = (Fraction(1, 16), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2))
LLAMA_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
LLAMA_TYPES_IMATRIX = ("Q4_K_M", "IQ4_XS")
Z95 = 1.959964  # two-sided 95 % normal quantile
# Types gguf-py can quantize (dense-stored pruning keeps the original's type when it is one of these).
GGUF_WRITABLE = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                           GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
                           GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0})
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    family: str
    label: str
    settings: Mapping[str, Any] = field(default_factory=dict)  # JSON-able: what makes the file

    @property
    def needs_imatrix(self) -> bool:
        return bool(self.settings.get("imatrix"))

    @property
    def needs_xtx(self) -> bool:
        return bool(self.settings.get("xtx"))


def density_label(d: Fraction) -> str:
    return f"{d.numerator}/{d.denominator}"


def seeddelta_candidates(densities: Sequence[Fraction] = DENSITIES, bases: Sequence[bool] = (True, False),
                         imatrix: Sequence[bool] = (True, False)) -> list[Candidate]:
    return [Candidate("seeddelta", f"SeedΔ d={density_label(d)} {'base' if b else 'no base'}{' imatrix' if i else ''}",
                      {"density": str(d), "base": b, "imatrix": i, "row_scale": True})
            for d in densities for b in bases for i in imatrix]


# The variant points of the comparison, by name: (base type, quantizer, rotate, residual density per row,
# coding, refit). Density 0 = the quantized base alone. The support is chosen with the imatrix when
# there is a residual; GPTQ and the refit read the calibration XᵀX.
VARIANT_POINTS: dict[str, tuple[str, str, bool, Fraction, str, str]] = {
    "Q8_0": ("Q8_0", "rtn", False, Fraction(0), "coo", "none"),
    "Q4_0": ("Q4_0", "rtn", False, Fraction(0), "coo", "none"),
    "Q4_0-rot": ("Q4_0", "rtn", True, Fraction(0), "coo", "none"),
    "Q4_0-gptq": ("Q4_0", "gptq", False, Fraction(0), "coo", "none"),
    "Q4_0-gptq-rot": ("Q4_0", "gptq", True, Fraction(0), "coo", "none"),
    "MXFP4-gptq": ("MXFP4", "gptq", False, Fraction(0), "coo", "none"),
    "Q4_0+1%-coo": ("Q4_0", "rtn", False, Fraction(1, 100), "coo", "none"),
    "Q4_0+1%-c8": ("Q4_0", "rtn", False, Fraction(1, 100), "c8", "none"),
    "Q4_0+1%-c8-refit": ("Q4_0", "rtn", False, Fraction(1, 100), "c8", "full"),
    "Q4_0-rot+1%-c8-refit": ("Q4_0", "rtn", True, Fraction(1, 100), "c8", "full"),
    "Q4_0-gptq+1%-c8-refit": ("Q4_0", "gptq", False, Fraction(1, 100), "c8", "full"),
    "MXFP4-gptq+1%-c8-refit": ("MXFP4", "gptq", False, Fraction(1, 100), "c8", "full"),
}


def variant_candidates(names: Sequence[str] | None = None) -> list[Candidate]:
    """The named `VARIANT_POINTS` (None: all of them), as candidates of family "variant"."""
    chosen = list(VARIANT_POINTS) if names is None else list(names)
    bad = [n for n in chosen if n not in VARIANT_POINTS]
    if bad:
        raise SeedDeltaError(f"unknown variant point {bad[0]!r} (expected {', '.join(VARIANT_POINTS)})")
    out = []
    for name in chosen:
        base, quantizer, rotate, density, coding, refit = VARIANT_POINTS[name]
        label = f"sdq {base}{' gptq' if quantizer == 'gptq' else ''}{' rot' if rotate else ''}"
        if density:
            label += f" +{float(density) * 100:g}% {coding}{' refit' if refit == 'full' else ''}"
        out.append(Candidate("variant", label, {
            "point": name, "base_type": base, "quantizer": quantizer, "rotate": rotate,
            "residual_density": str(density), "coding": coding, "refit": refit,
            "imatrix": density > 0, "xtx": quantizer == "gptq" or refit == "full"}))
    return out


def llamacpp_candidates(types: Sequence[str] = LLAMA_TYPES,
                        imatrix_types: Sequence[str] = LLAMA_TYPES_IMATRIX) -> list[Candidate]:
    return ([Candidate("llama.cpp", t, {"ftype": t, "imatrix": False}) for t in types]
            + [Candidate("llama.cpp", f"{t} imatrix", {"ftype": t, "imatrix": True}) for t in imatrix_types])


def pruning_candidates(densities: Sequence[Fraction] = DENSITIES, methods: Sequence[str] = ("magnitude", "wanda"),
                       storages: Sequence[str] = ("dense", "coo")) -> list[Candidate]:
    return [Candidate("pruning", f"{m} d={density_label(d)} {s}",
                      {"density": str(d), "method": m, "storage": s, "imatrix": m == "wanda"})
            for d in densities for m in methods for s in storages]


def default_candidates(densities: Sequence[Fraction] = DENSITIES) -> list[Candidate]:
    return ([Candidate("original", "original")] + seeddelta_candidates(densities) + llamacpp_candidates()
            + pruning_candidates(densities))


# ---------------------------------------------------------------------------------- bytes from the file
@dataclass(frozen=True)
class FfnStorage:
    bytes: int  # stored bytes of every tensor belonging to an FFN weight
    weights: int  # Σ n_in·n_out over the FFN weights
    types: dict[str, int]  # "Q5_0": number of FFN weights stored (densely) in that type; "SeedΔ": encoded ones

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.weights if self.weights else float("nan")


def ffn_storage(path: str | os.PathLike[str]) -> FfnStorage:
    """FFN bytes as stored in the file: dense FFN weight tensors plus every SeedΔ tensor."""
    model = GGUFModel(path, what="model")
    weights = 0
    for layer in range(model.n_layer):
        for kind in KINDS:
            n_in, n_out = model.weight_dims(layer, kind)
            weights += n_in * n_out
    dense = {weight_name(layer, kind) for layer in range(model.n_layer) for kind in KINDS}
    total = 0
    types: dict[str, int] = {}
    for name in model.tensors:
        if parse_seeddelta_name(name) is not None:
            total += model.tensor_nbytes(name)
        elif name in dense:
            total += model.tensor_nbytes(name)
            t = model.tensor_type(name).name
            types[t] = types.get(t, 0) + 1
    n_sd = len(model.seeddelta_weights())
    if n_sd:
        types["SeedΔ"] = n_sd
    return FfnStorage(total, weights, dict(sorted(types.items())))


# ---------------------------------------------------------------------------------- making the files
@dataclass
class Inputs:
    model: Path
    imatrix: Path | None
    threads: int = 0
    seed: int = 1234
    xtx: Path | None = None  # calibration Σ x xᵀ (variant points with GPTQ or refit)

    _imatrix: Imatrix | None = None

    def read_imatrix(self) -> Imatrix:
        if self.imatrix is None:
            raise SeedDeltaError("internal: an imatrix candidate without an imatrix")
        if self._imatrix is None:
            self._imatrix = read_imatrix(self.imatrix)
        return self._imatrix


def _k_per_kind(model: GGUFModel, density: Fraction) -> dict[str, int]:
    """K of each kind for a density (every layer of a kind has the same n_in in a llama model)."""
    out = {}
    for kind in KINDS:
        n_in, _ = model.weight_dims(0, kind)
        out[kind] = keep_count(float(density), n_in)
    return out


def _build(inputs: Inputs, out: Path, density: Fraction, *, base: bool, row_scale: bool, imatrix: bool) -> None:
    ks = _k_per_kind(GGUFModel(inputs.model, what="model"), density)
    opts = BuildOptions(input=str(inputs.model), output=str(out), K=ks["ffn_gate"], K_gate=ks["ffn_gate"],
                        K_up=ks["ffn_up"], K_down=ks["ffn_down"], base=base, row_scale=row_scale,
                        imatrix=str(inputs.imatrix) if imatrix else None, strip_dense=True, progress=False,
                        threads=inputs.threads, seed=inputs.seed)
    with open(os.devnull, "w") as quiet:  # the builder's warnings (e.g. "SeedΔ grew the file") are the point here
        run_build(opts, log=quiet)


def _build_variant(inputs: Inputs, out: Path, s: Mapping[str, Any]) -> None:
    """Every FFN weight as variant sdq with the candidate's settings (K = density·n_in per kind, 0 for
    the base alone)."""
    density = Fraction(s["residual_density"])
    ks = _k_per_kind(GGUFModel(inputs.model, what="model"), density) if density else dict.fromkeys(KINDS, 0)
    opts = BuildOptions(input=str(inputs.model), output=str(out), K=ks["ffn_gate"], K_gate=ks["ffn_gate"],
                        K_up=ks["ffn_up"], K_down=ks["ffn_down"], base=False, row_scale=False,
                        imatrix=str(inputs.imatrix) if s["imatrix"] else None, strip_dense=True, progress=False,
                        threads=inputs.threads, seed=inputs.seed, variant="sdq", quant_base=str(s["base_type"]),
                        quantizer=str(s["quantizer"]), rotate=bool(s["rotate"]), coding=str(s["coding"]),
                        refit=str(s["refit"]), xtx=str(inputs.xtx) if s["xtx"] and inputs.xtx else None)
    with open(os.devnull, "w") as quiet:
        run_build(opts, log=quiet)


def write_dense_pruned(src_path: Path, out: Path, density: Fraction, method: str, imatrix: Imatrix | None) -> None:
    """`src` with every FFN weight pruned per row and stored densely (zeros included)."""
    src = GGUFModel(src_path, what="model")
    replace = {}
    for layer in range(src.n_layer):
        for kind in KINDS:
            name = weight_name(layer, kind)
            if name not in src.tensors:
                continue
            W = src.dense(name)
            stats = imatrix.entry(name, W.shape[1]) if method == "wanda" and imatrix is not None else None
            P = pruned(W, keep_indices(W, float(density), method, stats))
            qtype = src.tensor_type(name)
            qtype = qtype if qtype in GGUF_WRITABLE else GGMLQuantizationType.F16
            data = P.astype(np.float16) if qtype == GGMLQuantizationType.F16 else quantize(P, qtype)
            replace[name] = RawTensor(data, qtype, tuple(int(d) for d in src.tensors[name].shape))
    write_model_copy(src, out, replace_tensors=replace)


def make_candidate(c: Candidate, inputs: Inputs, out: Path) -> dict[str, Any]:
    """Write candidate `c`'s file to `out`; returns what the maker reports (e.g. llama.cpp's types)."""
    s = c.settings
    if c.family == "seeddelta":
        _build(inputs, out, Fraction(s["density"]), base=bool(s["base"]), row_scale=bool(s["row_scale"]),
               imatrix=bool(s["imatrix"]))
        return {}
    if c.family == "variant":
        _build_variant(inputs, out, s)
        return {}
    if c.family == "llama.cpp":
        types = quantize_ffn(inputs.model, out, str(s["ftype"]),
                             imatrix=inputs.read_imatrix() if s["imatrix"] else None, threads=inputs.threads)
        return {"llama_types": types}
    if c.family == "pruning":
        d = Fraction(s["density"])
        if s["storage"] == "coo":
            # per-row top-K of |W| (magnitude) or |W|·s (Wanda): SeedΔ with no base and no row scale
            _build(inputs, out, d, base=False, row_scale=False, imatrix=s["method"] == "wanda")
        else:
            write_dense_pruned(inputs.model, out, d, str(s["method"]),
                               inputs.read_imatrix() if s["method"] == "wanda" else None)
        return {}
    raise SeedDeltaError(f"internal: cannot make a {c.family} candidate")


# ---------------------------------------------------------------------------------- measuring
def window_means(x: np.ndarray, windows: Windows) -> list[float]:
    """Mean of a per-token array over each window's scored tokens (for bootstraps over windows)."""
    per = x.reshape(windows.n_chunk, -1)
    return [float(v) for v in per.mean(axis=1)]


def kld_row(r: KldResult, windows: Windows) -> dict[str, Any]:
    """The evaluator's figures for one candidate (means with standard errors, ΔPPL with its 95 % interval)."""
    s = r.summary()
    d, se = s["delta_nll"]["mean"], s["delta_nll"]["se"]
    return {
        "kld_mean": s["kld"]["mean"], "kld_se": s["kld"]["se"], "kld_p99": s["kld"]["p99"],
        "same_top_p": s["same_top_p"]["mean"], "delta_nll": d, "delta_nll_se": se,
        "ppl_base": s["ppl_base"]["ppl"], "ppl": s["ppl_model"]["ppl"],
        "delta_ppl_pct": 100.0 * math.expm1(d),
        "delta_ppl_pct_ci95": [100.0 * math.expm1(d - Z95 * se), 100.0 * math.expm1(d + Z95 * se)],
        "n_tokens": s["n_tokens"],
        "window_delta_nll": window_means(r.nll_model - r.nll_base, windows),
    }


def pareto(rows: Sequence[Mapping[str, Any]], x: str = "bits_per_weight", y: str = "kld_mean") -> list[bool]:
    """True for rows no other row beats: none has x ≤ and y ≤ with one of them strictly smaller."""
    out = []
    for r in rows:
        dominated = any(o[x] <= r[x] and o[y] <= r[y] and (o[x] < r[x] or o[y] < r[y]) for o in rows if o is not r)
        out.append(not dominated)
    return out


@dataclass
class EqualBytesResult:
    rows: list[dict[str, Any]]
    skipped: list[str]  # one line per candidate group not measured, with the reason


def run_equal_bytes(inputs: Inputs, base_logits: Logits, windows: Windows, candidates: Iterable[Candidate],
                    work_dir: Path, cache: ResultCache, progress: Progress | None = None,
                    keep_files: bool = False) -> EqualBytesResult:
    """Make and measure every candidate (cached per candidate), in the order given."""
    note = progress or (lambda _m: None)
    cands, skipped = runnable(candidates, inputs)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n, c in enumerate(cands, 1):
        settings = {"family": c.family, **dict(c.settings)}
        row = cache.get("equal_bytes", settings)
        if row is None:
            row = measure_candidate(c, inputs, base_logits, windows, work_dir, keep_files)
            cache.put("equal_bytes", settings, row)
        rows.append(row)
        note(f"[equal bytes {n}/{len(cands)}] {c.label}: {row['bits_per_weight']:.2f} bits/weight, KLD "
             f"{row['kld_mean']:.5f}, ΔPPL {row['delta_ppl_pct']:+.2f}%  {time.perf_counter() - t0:.0f}s")
    mark_pareto(rows)
    return EqualBytesResult(rows, skipped)


def runnable(candidates: Iterable[Candidate], inputs: Inputs) -> tuple[list[Candidate], list[str]]:
    """The candidates that can be made here, and one line per group that cannot (with the reason):
    llama.cpp points without llama-cpp-python, imatrix points without an imatrix."""
    cands = list(candidates)
    skipped: list[str] = []
    why_quant = unavailable_reason() if any(c.family == "llama.cpp" for c in cands) else None
    if why_quant is not None:
        n = sum(c.family == "llama.cpp" for c in cands)
        skipped.append(f"llama.cpp quantization points skipped ({n}): {why_quant}")
        cands = [c for c in cands if c.family != "llama.cpp"]
    if inputs.imatrix is None and any(c.needs_imatrix for c in cands):
        n = sum(c.needs_imatrix for c in cands)
        skipped.append(f"imatrix points skipped ({n}): no imatrix (calibration text) given")
        cands = [c for c in cands if not c.needs_imatrix]
    if inputs.xtx is None and any(c.needs_xtx for c in cands):
        n = sum(c.needs_xtx for c in cands)
        skipped.append(f"variant points needing XᵀX skipped ({n}): no calibration text given")
        cands = [c for c in cands if not c.needs_xtx]
    return cands, skipped


def mark_pareto(rows: Sequence[dict[str, Any]]) -> None:
    for row, front in zip(rows, pareto(rows), strict=True):
        row["pareto"] = front


def measure_candidate(c: Candidate, inputs: Inputs, base_logits: Logits, windows: Windows, work_dir: Path,
                      keep_files: bool = False) -> dict[str, Any]:
    """Make candidate `c`'s file, count its FFN bytes and measure it against the base's logits."""
    made: dict[str, Any] = {}
    if c.family == "original":
        path = inputs.model
    else:
        path = work_dir / (c.label.replace(" ", "_").replace("/", "-").replace("=", "") + ".gguf")
        made = make_candidate(c, inputs, path)
    try:
        storage = ffn_storage(path)
        loaded = load(path, mode="sparse")
        result = kl_divergence(base_logits, model_logits(loaded.model), windows)
        del loaded
    finally:
        if c.family != "original" and not keep_files and path.exists():
            os.unlink(path)
    row: dict[str, Any] = {"family": c.family, "label": c.label, "settings": dict(c.settings),
                           "ffn_bytes": storage.bytes, "ffn_weights": storage.weights,
                           "bits_per_weight": storage.bits_per_weight, "ffn_types": storage.types}
    if "llama_types" in made:
        row["ffn_types"] = _count(made["llama_types"].values())
    row.update(kld_row(result, windows))
    return row


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------- the table
def types_text(types: Mapping[str, int]) -> str:
    return ", ".join(f"{t}×{n}" for t, n in types.items())


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows sorted by bits per weight; Pareto points marked ★."""
    lines = ["| candidate | family | FFN storage | bits/weight | mean KLD | same top-1 | ΔPPL % [95 % interval] |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["bits_per_weight"], r["kld_mean"])):
        star = " ★" if r.get("pareto") else ""
        lo, hi = r["delta_ppl_pct_ci95"]
        lines.append(f"| {r['label']}{star} | {r['family']} | {types_text(r['ffn_types'])} | {r['bits_per_weight']:.2f} "
                     f"| {r['kld_mean']:.5f} | {r['same_top_p']:.1%} | {r['delta_ppl_pct']:+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines)
