"""B1 of the user's plan: the original model's figures every later threshold is read against.

PPL ± se at ctx 512/1024/2048 (llama-perplexity's windows), the determinism check (a second forward
of a window must give bit-identical logits), the spread of the estimate over windows (window
bootstrap of ln PPL; even against odd windows), the greedy pack, prompt and decode throughput, and
the file size and resident memory of the loaded weights in a fresh process. Lives apart from the
suite's planning because its result is cached: its code is part of the cache's code fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from seeddelta.errors import SeedDeltaError
from seeddelta.evaluation.pack import limit_per_task
from seeddelta.evaluation.scoring import decode_speed, model_logits, perplexity
from seeddelta.regress.criteria import CTXS
from seeddelta.regress.measure import Evaluator, fresh_process_memory, greedy_summary
from seeddelta.regress.stats import bootstrap_windows

Progress = Callable[[str], None]
RSS_REPEATS = 3  # fresh-process loads of the original: their median is the reference, max − min the spread


def b1(ev: Evaluator, chunks: int, greedy_limit: int, model: Path, note: Progress) -> dict[str, Any]:
    """B1: the original's figures (see the suite's docstring)."""
    out: dict[str, Any] = {"ppl": {}, "skipped": []}
    for ctx in CTXS:
        try:
            w = ev.windows(ctx, chunks)
        except SeedDeltaError as exc:
            out["skipped"].append(f"ctx {ctx}: {exc}")
            continue
        note(f"[B1] perplexity of the original at ctx {ctx} ({w.n_chunk} windows)")
        r = perplexity(ev.base_logits(ctx, chunks), w)
        again = model_logits(ev.base.model)(w.inputs[0], w.first)  # same window, fresh forward
        per_window = r.nll.reshape(w.n_chunk, -1).mean(axis=1)
        boot = bootstrap_windows(per_window)
        halves = float(per_window[0::2].mean() - per_window[1::2].mean()) if w.n_chunk > 1 else None
        out["ppl"][str(ctx)] = {
            "ppl": r.ppl, "se": r.se, "windows": w.n_chunk, "tokens_scored": int(r.nll.size),
            "deterministic": bool(np.array_equal(again.numpy(), ev.base_logits(ctx, chunks)(w.inputs[0], w.first).numpy())),
            "ln_ppl_bootstrap_sd": boot["sd"], "ln_ppl_ci95": [boot["lo95"], boot["hi95"]],
            "ln_ppl_even_minus_odd_windows": halves, "prompt_tok_per_s": r.prompt_tok_per_s,
        }
    prompt = ev.windows(512, 1).inputs[0][:64] if "512" in out["ppl"] else [1, 2, 3]
    out["decode"] = decode_speed(ev.base.model, [int(t) for t in prompt], 32)
    if ev.pack:
        note(f"[B1] greedy pack of the original ({len(limit_per_task(ev.pack, greedy_limit))} prompts)")
        g = ev.base_greedy(greedy_limit)
        out["greedy"] = {**greedy_summary(g, None), "throughput": g["throughput"]}
    note(f"[B1] resident memory of the original, {RSS_REPEATS} fresh processes")
    mems = [fresh_process_memory(model, "materialized") for _ in range(RSS_REPEATS)]
    rss = sorted(int(m["rss_anon_load_delta_bytes"]) for m in mems)
    out["memory"] = {"file_bytes": model.stat().st_size, "rss_anon_load_delta_bytes": rss[len(rss) // 2],
                     "rss_spread_bytes": rss[-1] - rss[0], "rss_repeats": RSS_REPEATS,
                     "weights_bytes": mems[0]["weights_bytes"]}
    return out


