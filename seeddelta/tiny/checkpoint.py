"""Training checkpoints of the tiny model: written atomically, read back into a model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from seeddelta.errors import SeedDeltaError
from seeddelta.outputs import AtomicOutput
from seeddelta.tiny.model import TinyConfig, TinyLlama


def save_checkpoint(path: Path, model: TinyLlama, opt: torch.optim.Optimizer, cfg: Any,
                    state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(path, {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "train_config": cfg.to_dict(),
        "model_config": model.cfg.to_dict(),
        "state": state,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    })


def save_atomic(path: Path, obj: dict) -> None:
    with AtomicOutput(path, "checkpoint") as out:
        torch.save(obj, out.tmp)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise SeedDeltaError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def model_from_checkpoint(ck: dict) -> TinyLlama:
    model = TinyLlama(TinyConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    model.eval()
    return model
