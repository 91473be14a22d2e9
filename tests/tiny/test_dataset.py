"""The tiny dataset: template, labels (independent checkers), class balance, disjoint splits, determinism."""

from __future__ import annotations

import random
import re
from itertools import islice

import pytest

from seeddelta.assets import TINY_TEST_PACK, TINY_VAL_TEXT
from seeddelta.tiny import dataset as ds

TEMPLATE = re.compile(r"### TASK\n(copy|sum|brackets)\n### INPUT\n([^\n]*)\n### OUTPUT\n([^\n]*)\n")


def _balanced_by_reduction(s: str) -> bool:
    """Independent of the generator's running-depth check: delete "()" pairs until nothing changes."""
    prev = None
    while prev != s:
        prev, s = s, s.replace("()", "")
    return s == ""


def _check_sample(task: str, input_line: str, answer: str) -> None:
    if task == "copy":
        assert input_line.startswith("IN: ")
        payload = input_line[4:]
        assert 8 <= len(payload) <= 32, "copy payload length is 8–32 characters"
        assert payload == payload.strip(), "no leading/trailing space (so nothing is stripped away)"
        assert set(payload) <= set(ds.COPY_ALPHABET)
        assert answer == payload
    elif task == "sum":
        m = re.fullmatch(r"SUM: (\d+)\+(\d+)", input_line)
        assert m, input_line
        a, b = int(m.group(1)), int(m.group(2))
        assert 0 <= a <= 999 and 0 <= b <= 999
        assert answer == str(a + b)
    else:
        m = re.fullmatch(r"BAL: ([()]+)", input_line)
        assert m, input_line
        s = m.group(1)
        assert 6 <= len(s) <= 20
        assert answer == ("OK" if _balanced_by_reduction(s) else "BAD")


@pytest.fixture(scope="module")
def heldout():
    return ds.make_heldout(ds.DEFAULT_SEED)


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    # the shipped val/test data must be reproducible from the code and the seed, byte for byte
    val_path, test_path = ds.write_heldout(tmp_path, ds.DEFAULT_SEED)
    assert val_path.read_bytes() == TINY_VAL_TEXT.read_bytes()
    assert test_path.read_bytes() == TINY_TEST_PACK.read_bytes()


def test_same_seed_same_data_other_seed_other_data(heldout):
    again = ds.make_heldout(ds.DEFAULT_SEED)
    assert again == heldout
    other = ds.make_heldout(ds.DEFAULT_SEED + 1, n_val=30, n_test_per_task=10)
    assert [s.text for s in other[0]] != [s.text for s in heldout[0][:30]]
    a = [s.text for s in islice(ds.train_samples(7, 3, set()), 50)]
    b = [s.text for s in islice(ds.train_samples(7, 3, set()), 50)]
    c = [s.text for s in islice(ds.train_samples(7, 4, set()), 50)]
    assert a == b and a != c, "the training stream is a pure function of (seed, step)"


def test_every_shipped_sample_follows_the_template_and_is_labelled_correctly():
    text = ds.load_val_text()
    pos = 0
    n = 0
    for m in TEMPLATE.finditer(text):
        assert m.start() == pos, "val text is a plain concatenation of samples, nothing in between"
        _check_sample(*m.groups())
        pos = m.end()
        n += 1
    assert pos == len(text) and n == ds.VAL_SAMPLES
    recs = ds.load_test_pack()
    assert [r.task for r in recs].count("copy") == ds.TEST_PER_TASK
    for r in recs:
        assert r.prompt.endswith("### OUTPUT\n")
        m = TEMPLATE.fullmatch(r.prompt + r.answer + "\n")
        assert m and m.group(1) == r.task
        _check_sample(*m.groups())
    assert len({r.id for r in recs}) == len(recs)


def test_training_stream_labels_and_task_mix():
    # 3000 samples: each task's share p=1/3 has sd sqrt(p(1-p)/n) = 0.0086; ±0.05 is ~6 sd
    samples = list(islice(ds.train_samples(1, 0, set()), 3000))
    for s in samples:
        _check_sample(s.task, s.input_line, s.answer)
    for t in ds.TASKS:
        assert abs(sum(s.task == t for s in samples) / 3000 - 1 / 3) < 0.05


def test_brackets_classes_are_balanced():
    # generator: exactly half of the draws are balanced strings by construction (p = 0.5);
    # with n = 4000, sd = 0.0079, so 45–55 % is a > 6 sd band
    rng = random.Random(123)
    labels = [ds.make_sample(rng, "brackets").answer for _ in range(4000)]
    share = labels.count("OK") / len(labels)
    assert 0.45 <= share <= 0.55
    # shipped splits (fixed files, not random at test time): same band
    test_b = [r.answer for r in ds.load_test_pack() if r.task == "brackets"]
    assert 0.45 <= test_b.count("OK") / len(test_b) <= 0.55
    val_b = [s.answer for s in ds.make_heldout()[0] if s.task == "brackets"]
    assert 0.45 <= val_b.count("OK") / len(val_b) <= 0.55


def test_balanced_strings_are_uniform_among_balanced_strings():
    # length 6 has exactly Catalan(3) = 5 balanced strings; 5000 draws, each expected 1000
    # (sd ≈ 28); every count within ±150 (> 5 sd) shows the draw is uniform, not a biased walk
    rng = random.Random(5)
    counts: dict[str, int] = {}
    for _ in range(5000):
        s = ds._random_balanced(rng, 6)
        counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 5 and all(_balanced_by_reduction(s) for s in counts)
    assert all(abs(c - 1000) < 150 for c in counts.values())


def test_splits_are_disjoint_and_deduplicated(heldout):
    val, test = heldout
    vt, tt = [s.text for s in val], [s.text for s in test]
    assert len(set(vt)) == len(vt) and len(set(tt)) == len(tt)
    assert not set(vt) & set(tt)
    held = set(vt) | set(tt)
    assert held == ds.heldout_texts(ds.DEFAULT_SEED)
    # the training stream skips held-out texts: force a collision with the stream's first sample
    first = next(ds.train_samples(11, 0, set()))
    second = list(islice(ds.train_samples(11, 0, {first.text}), 1))[0]
    assert second.text != first.text
    # and in practice no held-out text appears in the first training steps
    for step in range(20):
        for s in islice(ds.train_samples(ds.DEFAULT_SEED, step, held), 200):
            assert s.text not in held
