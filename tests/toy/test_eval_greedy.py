"""Greedy-pack logic on a scripted fake model: stop rules, answer extraction, collapse flags, verdict."""

from __future__ import annotations

import pytest
import torch

from seeddelta.evaluation.greedy import PackItem, greedy_decode, repetition_loop, run_pack, verdict

V = 128
BOS, EOS = 1, 2


class CharTok:
    bos_id, eos_id, add_bos = BOS, EOS, True

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([BOS] if add_bos else []) + [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 2)


class Scripted:
    """Emits a fixed continuation per prompt, whatever the cache holds; records what it was fed."""

    def __init__(self, scripts: dict[str, list[int]]) -> None:
        self.scripts = scripts
        self.fed: list[list[int]] = []
        self._cur: list[int] = []
        self._step = 0

    def new_cache(self, n: int) -> object:
        return object()

    def forward(self, ids, cache=None, logits_start: int = 0) -> torch.Tensor:
        ids = list(ids)
        self.fed.append(ids)
        if len(ids) > 1:  # prefill: pick the script of this prompt
            self._cur = self.scripts["".join(chr(i) for i in ids[1:])]
            self._step = 0
        nxt = self._cur[min(self._step, len(self._cur) - 1)]
        self._step += 1
        out = torch.zeros((len(ids), V))
        out[-1, nxt] = 1.0
        return out


def s(text: str) -> list[int]:
    return [ord(c) if c != "\x02" else EOS for c in text]


def test_decode_stops_at_newline_and_eos_and_max_new() -> None:
    m = Scripted({"a": s("42\nzz"), "b": s("OK\x02"), "c": s("x" * 50)})
    tok = CharTok()
    d = greedy_decode(m, tok, "a", max_new=10)
    assert (d.text, d.stop) == ("42\n", "newline")
    assert m.fed[0] == [BOS, ord("a")]  # BOS + prompt
    assert greedy_decode(m, tok, "b", 10).stop == "eos"
    d = greedy_decode(m, tok, "c", max_new=7)
    assert (d.stop, len(d.ids)) == ("max_new", 7)


def test_pack_scoring_flags_and_accuracy() -> None:
    m = Scripted({
        "p1": s("42\n"),                     # correct
        "p2": s("41\n"),                     # wrong, no flag
        "p3": s("\n"),                       # empty
        "p4": s("ab" * 20),                  # loop, no stop
        "p5": s("abababababababababab\n"),   # repeats, but it is the expected answer: not a loop
    })
    items = [PackItem("1", "sum", "p1", "42"), PackItem("2", "sum", "p2", "42"), PackItem("3", "copy", "p3", "x"),
             PackItem("4", "copy", "p4", "x"), PackItem("5", "copy", "p5", "ab" * 10)]
    r = run_pack(m, CharTok(), items, max_new=24)
    by = {it["id"]: it for it in r["items"]}
    assert [by[k]["exact"] for k in "12345"] == [True, False, False, False, True]
    assert by["1"]["flags"] == [] and by["2"]["flags"] == [] and by["5"]["flags"] == []
    assert by["3"]["flags"] == ["empty"]
    assert "no_stop" in by["4"]["flags"] and any(f.startswith("repetition_loop(period=2") for f in by["4"]["flags"])
    assert r["correct"] == 2 and r["flagged"] == 2
    assert r["tasks"]["sum"]["accuracy"] == 0.5 and r["tasks"]["copy"]["accuracy"] == pytest.approx(1 / 3)
    assert verdict(r, None, 0.05)["result"] == "FAIL"


@pytest.mark.parametrize("ids,expect", [
    ([5] * 16, (1, 16)),
    ([5] * 15, None),                     # span below 16
    ([1, 2, 3] * 6, (3, 18)),
    ([1, 2, 3, 4, 5, 6, 7, 8] * 2, None),  # only 2 repeats of an 8-gram
    (list(range(40)), None),
])
def test_repetition_loop(ids: list[int], expect) -> None:
    assert repetition_loop(ids) == expect


def test_verdict_against_base_with_tolerance() -> None:
    ok = {"flagged": 0, "accuracy": 0.90}
    assert verdict(ok, {"accuracy": 0.94}, 0.05)["result"] == "PASS"
    v = verdict(ok, {"accuracy": 0.96}, 0.05)
    assert v["result"] == "FAIL" and "below base" in v["reasons"][0]
    assert verdict(ok, None, 0.0)["result"] == "PASS"


@pytest.mark.parametrize("n", [-1, 0, 1, 2, 3, 4])
def test_limit_per_task_keeps_the_first_n_of_each_task_in_pack_order(n):
    from seeddelta.evaluation.pack import limit_per_task

    # tasks interleaved, 3 prompts of "a", 2 of "b": n = 2 and 3 sit on both sides of each task's count
    items = [PackItem(f"{t}{i}", t, "p", "x") for i, t in enumerate("abab" + "a")]
    got = limit_per_task(items, n)
    # oracle: an item is kept when fewer than n earlier items share its task; n <= 0 keeps everything
    want = [it for k, it in enumerate(items) if n <= 0 or sum(o.task == it.task for o in items[:k]) < n]
    assert got == want
    assert len(got) == (5 if n <= 0 else min(n, 3) + min(n, 2))
