"""PNG plots of the regress report (matplotlib, the `plots` extra): the equal-bytes Pareto plot,
the per-unit ΔNLL heat map, error against K, and the stack curves with their cliffs.

Every function writes one PNG atomically and returns None, or returns the reason it could not
(matplotlib missing), which the report prints instead of the picture. Figures are drawn with the
non-interactive Agg backend and fixed metadata, so the same data gives the same bytes."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from seeddelta.outputs import AtomicOutput

PLOTS_HINT = "matplotlib not installed (the plots extra: .venv/bin/pip install -e '.[plots]')"
FAMILY_STYLE = {"original": ("k", "*"), "seeddelta": ("tab:red", "o"), "variant": ("tab:purple", "D"),
                "llama.cpp": ("tab:blue", "s"), "pruning": ("tab:green", "^")}
# The reference the SmolLM2 target is set against: stock llama.cpp's Q4_0 (bits and KLD drawn
# as dotted lines, so a point's distance from the target can be read off the plot).
REFERENCE = ("llama.cpp", "Q4_0")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    with AtomicOutput(path) as out:
        # no date/software metadata: the same figure gives the same bytes
        fig.savefig(out.tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    fig.clf()


def pareto_plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str) -> str | None:
    """Bits per weight (x) against mean KLD (y, log) for every candidate; the Pareto front joined."""
    plt = _pyplot()
    if plt is None:
        return PLOTS_HINT
    fig, ax = plt.subplots(figsize=(8, 5.5))
    floor = min([r["kld_mean"] for r in rows if r["kld_mean"] > 0] or [1e-6]) / 3
    for family, (color, marker) in FAMILY_STYLE.items():
        pts = [r for r in rows if r["family"] == family]
        if pts:
            ax.scatter([r["bits_per_weight"] for r in pts], [max(r["kld_mean"], floor) for r in pts], c=color,
                       marker=marker, label=family, s=36, alpha=0.85, zorder=3)
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r["bits_per_weight"])
    ax.plot([r["bits_per_weight"] for r in front], [max(r["kld_mean"], floor) for r in front], "k--", lw=0.8,
            zorder=2, label="Pareto front")
    for r in front:
        ax.annotate(r["label"], (r["bits_per_weight"], max(r["kld_mean"], floor)), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ref = next((r for r in rows if (r["family"], r["label"]) == REFERENCE), None)
    if ref is not None:
        ax.axhline(max(ref["kld_mean"], floor), color="tab:blue", lw=0.8, ls=":", zorder=1,
                   label=f"{REFERENCE[1]}: KLD {ref['kld_mean']:.3g} at {ref['bits_per_weight']:.2f} bits")
        ax.axvline(ref["bits_per_weight"], color="tab:blue", lw=0.8, ls=":", zorder=1)
    ax.set_yscale("log")
    ax.set_xlabel("FFN bits per weight (bytes as stored in the file)")
    ax.set_ylabel(f"mean KL(original ‖ candidate), nats (0 drawn at {floor:.1e})")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return None


def heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str],
            path: str | os.PathLike[str], title: str, label: str) -> str | None:
    """A table of numbers as a heat map (one cell per unit), values written in the cells."""
    plt = _pyplot()
    if plt is None:
        return PLOTS_HINT
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 0.9 + 0.42 * len(rows)))
    im = ax.imshow(values, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.3f}", ha="center", va="center", fontsize=7, color="tab:cyan")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return None


def lines_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike[str],
               title: str, xlabel: str, ylabel: str, *, marks: Mapping[str, tuple[float, float]] | None = None,
               hline: float | None = None, logy: bool = False) -> str | None:
    """One line per series (x, y); optional marked points (e.g. cliffs) and a horizontal limit."""
    plt = _pyplot()
    if plt is None:
        return PLOTS_HINT
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", ms=4, label=name)
    for name, (x, y) in (marks or {}).items():
        ax.scatter([x], [y], s=140, facecolors="none", edgecolors="red", zorder=4)
        ax.annotate(name, (x, y), fontsize=7, xytext=(5, -10), textcoords="offset points", color="red")
    if hline is not None:
        ax.axhline(hline, color="red", lw=0.8, ls=":", label=f"limit {hline:g}")
    if logy:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return None
