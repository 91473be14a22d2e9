"""The original's results shared through files (evaluation.original_store): a second process reads back
exactly what the first computed, and nothing is read across a change of model, window or prompts."""

from __future__ import annotations

import math

import numpy as np
import torch

from seeddelta.evaluation.original_store import OriginalStore

SHA_A = "a" * 64
SHA_B = "b" * 64


class Counting:
    """A stand-in for the original's forward: distinct values per window, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, window: np.ndarray, first: int) -> torch.Tensor:
        self.calls += 1
        gen = torch.Generator().manual_seed(int(window.sum()) * 31 + first)
        # values no decimal format keeps exactly: a lossy round trip would show in torch.equal
        return torch.randn(len(window) - 1 - first, 7, generator=gen) / 3.0


def test_a_second_store_reads_the_first_ones_logits_bit_for_bit(tmp_path):
    window = np.arange(10, dtype=np.int64)
    first_compute, second_compute = Counting(), Counting()
    a = OriginalStore(tmp_path, SHA_A).logits(first_compute)(window, 2)
    b = OriginalStore(tmp_path, SHA_A).logits(second_compute)(window, 2)
    assert torch.equal(a, b) and a.dtype == b.dtype == torch.float32
    assert (first_compute.calls, second_compute.calls) == (1, 0)


def test_within_one_store_a_window_is_computed_once(tmp_path):
    compute = Counting()
    logits = OriginalStore(tmp_path, SHA_A).logits(compute)
    window = np.arange(12, dtype=np.int64)
    for _ in range(3):
        logits(window, 0)
    assert compute.calls == 1


def test_another_window_first_position_or_model_is_computed_anew(tmp_path):
    window = np.arange(10, dtype=np.int64)
    compute = Counting()
    OriginalStore(tmp_path, SHA_A).logits(compute)(window, 0)
    OriginalStore(tmp_path, SHA_A).logits(compute)(window, 1)  # the same tokens, scored from another position
    OriginalStore(tmp_path, SHA_A).logits(compute)(window + 1, 0)  # other tokens
    other = window.copy()
    other[-1] += 1  # only the last token differs
    OriginalStore(tmp_path, SHA_A).logits(compute)(other, 0)
    OriginalStore(tmp_path, SHA_B).logits(compute)(window, 0)  # another model file
    assert compute.calls == 5


def test_without_a_directory_nothing_is_written_and_each_store_computes(tmp_path):
    compute = Counting()
    window = np.arange(10, dtype=np.int64)
    OriginalStore(None, SHA_A).logits(compute)(window, 0)
    OriginalStore(None, SHA_A).logits(compute)(window, 0)
    assert compute.calls == 2
    assert list(tmp_path.iterdir()) == []


def test_greedy_answers_round_trip_exactly_and_are_keyed_by_the_prompts(tmp_path):
    calls: list[list[str]] = []
    result = {"n": 3, "accuracy": 2 / 3, "throughput": {"decode_tok_per_s": math.pi * 1e3},
              "items": [{"id": "p1", "flags": []}]}

    def compute(ids: list[str]) -> dict:
        calls.append(ids)
        return result

    first = OriginalStore(tmp_path, SHA_A).greedy(["p1", "p2", "p3"], lambda: compute(["p1", "p2", "p3"]))
    again = OriginalStore(tmp_path, SHA_A).greedy(["p1", "p2", "p3"], lambda: compute(["p1", "p2", "p3"]))
    assert first == again == result  # floats through JSON: Python's repr round-trips every double
    OriginalStore(tmp_path, SHA_A).greedy(["p1", "p2"], lambda: compute(["p1", "p2"]))  # one prompt fewer
    assert calls == [["p1", "p2", "p3"], ["p1", "p2"]]
