"""Ship a trained checkpoint: export to the package's tiny.gguf, measure it, write manifest.json.

The metrics are measured on the exported file (its F16 values loaded into the training-side model),
not on the float32 checkpoint, so they describe exactly what is shipped.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from seeddelta.assets import DATA_DIR, sha256_file
from seeddelta.errors import SeedDeltaError
from seeddelta.outputs import write_text_atomic
from seeddelta.runtime.tokenizers.spm import tiny_tokenizer
from seeddelta.tiny.checkpoint import load_checkpoint, model_from_checkpoint
from seeddelta.tiny.evaluate import evaluate_model
from seeddelta.tiny.export import export_gguf, load_gguf_model

TARGETS = {"copy": 0.95, "brackets": 0.95, "sum": 0.80, "ppl_ratio_2048_over_512": 1.05}


def targets_report(greedy: dict, ppl: dict) -> dict:
    out = {}
    for task in ("copy", "brackets", "sum"):
        acc = greedy[task]["accuracy"]
        out[task] = {"target": TARGETS[task], "measured": acc, "met": acc >= TARGETS[task]}
    ratio = ppl["2048"]["ppl"] / ppl["512"]["ppl"]
    out["ppl_ratio_2048_over_512"] = {"target": TARGETS["ppl_ratio_2048_over_512"], "measured": ratio,
                                      "met": ratio <= TARGETS["ppl_ratio_2048_over_512"]}
    return out


def _parent_training(init_from: dict | None, outdir: Path) -> dict | None:
    """The warm-start parent (path, sha256) with its manifest's training record, so that a
    continued model's manifest states the whole history; the manifest is looked up by sha256."""
    if init_from is None:
        return None
    for cand in (outdir / "manifest.json", DATA_DIR / "manifest.json"):
        if cand.is_file():
            m = json.loads(cand.read_text())
            if m.get("gguf", {}).get("sha256") == init_from["sha256"]:
                return {**init_from, "training": m["training"], "evaluation": {
                    k: m["evaluation"][k] for k in ("greedy", "ppl")}}
    raise SeedDeltaError(f"warm-start parent {init_from['path']} (sha256 {init_from['sha256'][:12]}…) "
                         "has no manifest; its training history would be lost")


def release(ckpt: Path, outdir: Path = DATA_DIR, name: str = "seeddelta-tiny", notes: str = "",
            log=print) -> dict:
    ck = load_checkpoint(ckpt)
    parent = _parent_training(ck["state"].get("init_from"), outdir)  # read before tiny.gguf is replaced
    model = model_from_checkpoint(ck)
    tok = tiny_tokenizer()
    gguf_path = export_gguf(model, tok, outdir / "tiny.gguf", name=name)
    log(f"exported {gguf_path}")
    torch.set_num_threads(2)
    t0 = time.time()
    res = evaluate_model(load_gguf_model(gguf_path))
    eval_s = time.time() - t0
    state = ck["state"]
    tcfg = ck["train_config"]
    manifest = {
        "format": "seeddelta-tiny-manifest/1",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gguf": {"file": gguf_path.name, "sha256": sha256_file(gguf_path),
                 "size_bytes": gguf_path.stat().st_size, "tensor_types": "2-D F16, norms F32"},
        "model_config": ck["model_config"],
        "tokenizer": {"kind": "llama SPM (tokenizer.ggml.model=llama)", "n_vocab": tok.n_vocab,
                      "add_space_prefix": False, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                      "unk_id": tok.unk_id, "byte_pieces": 256},
        "training": {
            "seed": tcfg["seed"], "config": tcfg, "steps": state["step"], "tokens": state["tokens"],
            "wall_seconds": round(state["elapsed"], 1), "schedule_changes": state.get("schedule_changes", []),
            "best_val_nll512": state.get("best_val"), "best_val_step": state.get("best_step"),
            "checkpoint": str(ckpt), "torch": torch.__version__, "threads": tcfg.get("threads"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        },
        "data": {"val_text": "val.txt", "test_pack": "test.jsonl", "dataset_seed": tcfg["seed"]},
        "evaluation": {
            "method": "exported F16 weights in the training-side torch model (seeddelta.tiny.evaluate); "
                      "greedy exact match up to the first newline on the shipped test pack; perplexity by "
                      "llama-perplexity's method (BOS-replaced window start, second half scored) on val.txt",
            "seconds": round(eval_s, 1),
            "greedy": res["greedy"],
            "ppl": res["ppl"],
            "items": [{"id": it["id"], "ok": it["ok"], "got": it["got"]} for it in res["items"]],
        },
        "targets": targets_report(res["greedy"], res["ppl"]),
        "notes": notes,
    }
    if parent is not None:
        t = manifest["training"]
        t["warm_start_from"] = parent
        t["total_steps"] = t["steps"] + parent["training"].get("total_steps", parent["training"]["steps"])
        t["total_tokens"] = t["tokens"] + parent["training"].get("total_tokens", parent["training"]["tokens"])
        t["total_wall_seconds"] = round(t["wall_seconds"] + parent["training"].get(
            "total_wall_seconds", parent["training"]["wall_seconds"]), 1)
    path = outdir / "manifest.json"
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n", "manifest")
    log(f"wrote {path}")
    return manifest
