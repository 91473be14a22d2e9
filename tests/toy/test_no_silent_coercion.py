"""No silent coercion: a value the tool cannot use as given is refused, or used with a warning that
says what was used — and what the files say agrees with what was used."""

from __future__ import annotations

import argparse
import json

import pytest
from gguf import GGUFReader

from seeddelta.cli import build_parser, main
from seeddelta.gguf_format.imatrix_file import write_imatrix
from seeddelta.testing.synthetic_gguf import make_llama_gguf

N_EMBD, N_FF = 32, 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("coerce")
    m = make_llama_gguf(d / "m.gguf", n_layer=3, n_embd=N_EMBD, n_ff=N_FF, n_head=2, n_head_kv=1, vocab=300, seed=5)
    (d / "text.txt").write_text("a small text about nothing in particular. " * 40)
    return d, m


def _kv(path) -> dict:
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("seeddelta.")}


def test_K_above_n_in_is_clamped_with_a_warning_and_the_used_K_is_stored(model, tmp_path, capsys):
    _d, m = model
    out, report = tmp_path / "k.gguf", tmp_path / "k.json"
    assert main(["build", "-i", m.path, "-o", str(out), "--K", "5000", "--report-json", str(report), "-q", "-t", "1"]) == 0
    err = capsys.readouterr().err
    assert f"K 5000 for ffn_gate exceeds its {N_EMBD} inputs: 3 weight(s) keep all {N_EMBD}" in err
    assert f"K 5000 for ffn_down exceeds its {N_FF} inputs" in err
    kv = _kv(out)
    assert kv["seeddelta.resid.K"] == N_FF and kv["seeddelta.resid.K_variable"] is True
    assert (kv["seeddelta.resid.K_gate"], kv["seeddelta.resid.K_up"], kv["seeddelta.resid.K_down"]) == (N_EMBD, N_EMBD, N_FF)
    for layer in range(3):
        assert kv[f"seeddelta.blk.{layer}.ffn_up.K"] == N_EMBD and kv[f"seeddelta.blk.{layer}.ffn_down.K"] == N_FF
    r = json.loads(report.read_text())
    assert (r["resid"]["K"], r["resid"]["K_gate"], r["resid"]["K_up"], r["resid"]["K_down"]) == (N_FF, N_EMBD, N_EMBD, N_FF)
    assert {w["K"] for w in r["weights"] if w["kind"] != "ffn_down"} == {N_EMBD}


def test_K_equal_to_n_in_is_used_as_given_without_a_warning(model, tmp_path, capsys):
    _d, m = model
    out = tmp_path / "k.gguf"
    assert main(["build", "-i", m.path, "-o", str(out), "--K-gate", str(N_EMBD), "--K-up", "8", "--K-down", "8",
                 "-q", "-t", "1"]) == 0
    assert "exceeds" not in capsys.readouterr().err
    kv = _kv(out)
    assert (kv["seeddelta.resid.K_gate"], kv["seeddelta.resid.K_down"]) == (N_EMBD, 8)


def test_layers_reversed_keeps_the_meaning_and_says_so_empty_is_an_error(model, tmp_path, capsys):
    _d, m = model
    out = tmp_path / "l.gguf"
    assert main(["build", "-i", m.path, "-o", str(out), "--layers", "2-1", "-q", "-t", "1"]) == 0
    err = capsys.readouterr().err
    assert "--layers '2-1' is a reversed range; read as 1-2" in err
    assert {k.split(".")[2] for k in _kv(out) if k.startswith("seeddelta.blk.")} == {"1", "2"}
    out.unlink()
    assert main(["build", "-i", m.path, "-o", str(out), "--layers", "", "-q", "-t", "1"]) == 2
    assert "selects no layer (omit --layers for every layer)" in capsys.readouterr().err
    assert not out.exists()


def test_a_context_beyond_the_models_warns(model, capsys):
    d, m = model  # the synthetic model's context_length is 256
    assert main(["ppl", "-m", m.path, "-f", str(d / "text.txt"), "-c", "300", "-q", "-t", "1"]) == 0
    assert "-c 300 is beyond the model's training context (256 tokens)" in capsys.readouterr().err
    assert main(["ppl", "-m", m.path, "-f", str(d / "text.txt"), "-c", "256", "--chunks", "1", "-q", "-t", "1"]) == 0
    assert "beyond" not in capsys.readouterr().err


def test_chunks_negative_means_all_and_zero_is_an_error(model, tmp_path, capsys):
    d, m = model
    runs = {}
    for chunks in ("-1", "-7", "2"):
        out = tmp_path / f"ppl{chunks}.json"
        assert main(["ppl", "-m", m.path, "-f", str(d / "text.txt"), "-c", "64", "--chunks", chunks,
                     "--json", str(out), "-q", "-t", "1"]) == 0
        runs[chunks] = json.loads(out.read_text())["chunks"]
    n_all = runs["-1"]
    assert n_all > 2 and runs["-7"] == n_all and runs["2"] == 2
    assert main(["ppl", "-m", m.path, "--chunks", "0"]) == 2
    assert "0 would score nothing" in capsys.readouterr().err


def _threaded_commands() -> list[tuple[str, ...]]:
    out = []

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for name, child in subs[0].choices.items():
                walk(child, (*words, name))
        elif any("-t" in a.option_strings for a in parser._actions):
            out.append(words)

    walk(build_parser(), ())
    return out


THREADED = _threaded_commands()


def test_every_command_that_computes_takes_threads():
    names = {" ".join(w) for w in THREADED}
    assert {"demo", "toy", "build", "ppl", "kld", "greedy", "imatrix", "sweep"} <= names, names


@pytest.mark.parametrize("words", THREADED, ids=[" ".join(w) for w in THREADED])
def test_negative_threads_mean_the_same_everywhere(words, capsys):
    assert main([*words, "-t", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument -t/--threads: must be >= 0, got -1" in err[0], err


@pytest.mark.parametrize("line,needle", [
    ('{"id": "a", "task": "t", "prompt": "p", "answer": 7}', "field 'answer' must be a string, got 7 (int)"),
    ('{"id": 3, "task": "t", "prompt": "p", "answer": "x"}', "field 'id' must be a string, got 3 (int)"),
    ('{"id": "a", "task": "t", "prompt": "p"}', "field 'answer' is missing"),
    ('["a", "t", "p", "x"]', "expected a JSON object with id, task, prompt, answer, got list"),
    ('{"id": "a", "task": "t", "prompt": "p", "answer": "x"', "not valid JSON"),
    ('{"id": "one", "task": "t", "prompt": "p", "answer": "x"}', "id 'one' repeats line 1"),
    ('{"id": "b", "task": "t", "prompt": "", "answer": "x"}', "field 'prompt' is empty"),
])
def test_a_bad_greedy_pack_line_is_an_error_naming_file_and_line(model, tmp_path, capsys, line, needle):
    _d, m = model
    pack = tmp_path / "pack.jsonl"
    pack.write_text('{"id": "one", "task": "t", "prompt": "p", "answer": "x"}\n\n' + line + "\n")
    assert main(["greedy", "-m", m.path, "--pack", str(pack), "-q", "-t", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pack {pack}:3: {needle}" in err[0], err


def test_a_damaged_imatrix_is_refused_by_build(model, tmp_path, capsys):
    _d, m = model
    import numpy as np

    sums = {f"blk.{i}.{k}.weight": np.ones(N_FF if k == "ffn_down" else N_EMBD, np.float32)
            for i in range(3) for k in ("ffn_gate", "ffn_up", "ffn_down")}
    counts = dict.fromkeys(sums, 16)
    counts["blk.2.ffn_up.weight"] = 0
    write_imatrix(tmp_path / "im.gguf", sums, counts, ["x"], 1, 16)
    out = tmp_path / "o.gguf"
    assert main(["build", "-i", m.path, "-o", str(out), "--imatrix", str(tmp_path / "im.gguf"), "-q", "-t", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blk.2.ffn_up.weight.counts is 0" in err[0], err
    assert not out.exists()


def test_a_toy_case_larger_than_memory_is_refused_before_allocating(capsys, monkeypatch):
    import seeddelta.resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda: 1 << 30)  # 1 GiB available
    assert main(["toy", "--pattern", "identity", "--n-in", "8192", "--n-out", "8192"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs about" in err[0] and "1.0 GiB are available" in err[0], err
    # the other side: a case that fits runs
    assert main(["toy", "--pattern", "identity", "--n-in", "64", "--n-out", "64", "-q"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv,needle", [
    (["--K-gate", "0"], "argument --K-gate: must be a positive integer, got 0"),
    (["--chunks", "0"], "argument --chunks: 0 would score nothing"),
    (["--limit", "-1"], "argument --limit: must be >= 0, got -1"),
    (["--max-delta-nll", "nan"], "argument --max-delta-nll: must be a finite number, got nan"),
    (["-c", "4096"], "-c 4096 is beyond the model's training context (2048 tokens)"),
])
def test_demo_checks_every_option_before_its_first_step(tmp_path, capsys, argv, needle):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--skip-toy", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("warning: ")]
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()  # no half-made run directory
