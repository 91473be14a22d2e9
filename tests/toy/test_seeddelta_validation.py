"""A SeedΔ file is validated before it runs, the same way in every command and both runtime modes.

Valid files written by `seeddelta build` are damaged one tensor at a time (an index out of range
on either side, a base_perm that is not a permutation, NaN/Inf in values, row scale or base
diagonals, inconsistent shapes); every command that runs a model refuses each with one line
naming the tensor and the problem, exit status 2, no output written; `inspect` lists the file as
invalid and `--check` exits 1. Bad header values are one line naming the key."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType

from seeddelta.cli import main
from seeddelta.gguf_format.reader import GGUFModel
from seeddelta.gguf_format.writer import KV, write_model_copy
from seeddelta.testing.synthetic_gguf import make_llama_gguf

N_EMBD, N_FF = 32, 64  # gate/up tall (L 32, B 2), down wide (L 32, B 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdval")
    m = make_llama_gguf(d / "dense.gguf", n_layer=2, n_embd=N_EMBD, n_ff=N_FF, n_head=2, n_head_kv=1, vocab=300, seed=3)
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    coo, block = d / "coo.gguf", d / "block.gguf"
    assert main(["build", "-i", m.path, "-o", str(coo), "--K", "4", "--base", "--row-scale", "-q", "-t", "1"]) == 0
    assert main(["build", "-i", m.path, "-o", str(block), "--scheme", "block", "--block", "8", "--K", "16",
                 "--row-scale", "-q", "-t", "1"]) == 0
    return d, m.path


def _damage(src: Path, dst: Path, name: str, change) -> None:
    model = GGUFModel(src)
    array = np.array(model.tensors[name].data, copy=True)
    change(array)
    write_model_copy(model, dst, drop_tensors={name}, add_tensors=[(name, array)])


def _set(index, value):
    def change(a: np.ndarray) -> None:
        a[index] = value
    return change


def _not_a_permutation(a: np.ndarray) -> None:
    a[0, 1] = a[0, 0]  # block 0 repeats a value


# (label, file, tensor, change, the problem in the error line)
DAMAGE = [
    ("idx_high", "coo", "blk.1.ffn_up.d_idx", _set((5, 2), N_EMBD), "d_idx: 1 index value(s) outside 0 <= i < n_in = 32"),
    ("idx_negative", "coo", "blk.0.ffn_down.d_idx", _set((3, 0), -1), "d_idx: 1 index value(s) outside 0 <= i < n_in = 64"),
    ("perm_repeat", "coo", "blk.0.ffn_gate.base_perm1", _not_a_permutation, "base_perm1: block 0 is not a permutation"),
    ("perm_range", "coo", "blk.1.ffn_down.base_perm1", _set((1, 3), 32), "base_perm1: block 1 is not a permutation"),
    ("val_nan", "coo", "blk.0.ffn_up.d_val", _set((7, 1), np.nan), "d_val: 1 NaN/Inf value(s)"),
    ("val_inf", "coo", "blk.1.ffn_gate.d_val", _set((0, 0), np.inf), "d_val: 1 NaN/Inf value(s)"),
    ("scale_nan", "coo", "blk.0.ffn_gate.d_row_scale", _set(4, np.nan), "d_row_scale: 1 NaN/Inf value(s)"),
    ("d1_inf", "coo", "blk.1.ffn_up.base_d1", _set((0, 5), -np.inf), "base_d1: 1 NaN/Inf value(s)"),
    ("d2_nan", "coo", "blk.0.ffn_down.base_d2", _set((1, 0), np.nan), "base_d2: 1 NaN/Inf value(s)"),
    ("b_idx_high", "block", "blk.0.ffn_up.b_idx", _set((2, 0), 4), "b_idx: 1 index value(s) outside 0 <= i < the number of blocks = 4"),
    ("b_val_nan", "block", "blk.1.ffn_down.b_val", _set((0, 0, 0), np.nan), "b_val: 1 NaN/Inf value(s)"),
]
SHAPE = ("shape", "coo", "blk.0.ffn_up.d_val", "d_idx: shapes d_idx (64, 4) / d_val (64, 3)")


@pytest.fixture(scope="module")
def damaged(files):
    d, _dense = files
    out = {}
    for label, kind, name, change, _needle in DAMAGE:
        out[label] = d / f"bad_{label}.gguf"
        _damage(d / f"{kind}.gguf", out[label], name, change)
    model = GGUFModel(d / "coo.gguf")
    val = np.array(model.tensors[SHAPE[2]].data)[:, :3].copy()
    out["shape"] = d / "bad_shape.gguf"
    write_model_copy(model, out["shape"], drop_tensors={SHAPE[2]}, add_tensors=[(SHAPE[2], val)])
    return out


CASES = [(label, name, needle) for label, _k, name, _c, needle in DAMAGE] + [(SHAPE[0], SHAPE[2], SHAPE[3])]
COMMANDS = {
    "ppl": lambda m, d, dense, out: ["ppl", "-m", m, "-f", str(d / "text.txt"), "-c", "16", "--json", out],
    "kld": lambda m, d, dense, out: ["kld", "--base", dense, "-m", m, "-f", str(d / "text.txt"), "-c", "16",
                                     "--json", out],
    "greedy": lambda m, d, dense, out: ["greedy", "-m", m, "--limit", "1", "--json", out],
    "imatrix": lambda m, d, dense, out: ["imatrix", "-m", m, "-f", str(d / "text.txt"), "-c", "16", "-o", out],
}


# every damage through `ppl` in both modes; every command in both modes on one damage of each class
# (index, permutation, non-finite value) — they all load through the same `load_model`
REPRESENTATIVE = ("idx_negative", "perm_range", "val_nan")
MATRIX = ([(c, "ppl", mode) for c in CASES for mode in ("materialized", "sparse")]
          + [(c, command, mode) for c in CASES if c[0] in REPRESENTATIVE for command in sorted(COMMANDS)
             if command != "ppl" for mode in ("materialized", "sparse")])


@pytest.mark.parametrize("case,command,mode", MATRIX, ids=[f"{c[0]}-{cmd}-{m}" for c, cmd, m in MATRIX])
def test_every_runtime_command_refuses_a_damaged_file(files, damaged, capsys, case, command, mode):
    label, tensor, needle = case
    d, dense = files
    out = d / f"out_{command}_{label}_{mode}"
    argv = COMMANDS[command](str(damaged[label]), d, dense, str(out)) + (["--sparse"] if mode == "sparse" else [])
    before = sorted(os.listdir(d))
    rc = main([*argv, "-q", "-t", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("warning: ")]
    assert rc == 2, (argv, err)
    assert len(err) == 1, err
    suffix = tensor.rsplit(".", 1)[1] if label != "shape" else "d_idx"
    assert f"SeedΔ tensor {tensor.rsplit('.', 1)[0]}.{suffix}" in err[0] and needle.split(": ", 1)[1] in err[0], err
    assert str(damaged[label]) in err[0]  # the file is named (kld loads two)
    assert sorted(os.listdir(d)) == before  # no output, no temp file


@pytest.mark.parametrize("label,tensor,needle", CASES, ids=[c[0] for c in CASES])
def test_sweep_refuses_a_damaged_file_before_measuring(files, damaged, capsys, label, tensor, needle):
    d, _dense = files
    rc = main(["sweep", "-m", str(damaged[label]), "-f", str(d / "text.txt"), "-c", "16", "-q", "-t", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle.split(": ", 1)[1] in err[0], err


@pytest.mark.parametrize("label,tensor,needle", CASES, ids=[c[0] for c in CASES])
def test_inspect_reports_the_damage_and_check_fails(damaged, capsys, label, tensor, needle):
    assert main(["inspect", str(damaged[label])]) == 0  # a report: the listing itself succeeded
    out = capsys.readouterr().out
    assert "INVALID: 1 weight(s) cannot run" in out and needle.split(": ", 1)[1] in out, out
    assert main(["inspect", str(damaged[label]), "--check"]) == 1
    capsys.readouterr()


def test_valid_files_pass_everywhere(files, capsys):
    # the other side of the boundary: the undamaged files run and check clean in both modes
    d, dense = files
    for kind, mode in (("coo", []), ("block", ["--sparse"])):
        assert main(["inspect", str(d / f"{kind}.gguf"), "--check"]) == 0
        assert "valid: every SeedΔ weight passes" in capsys.readouterr().out
        assert main(["ppl", "-m", str(d / f"{kind}.gguf"), "-f", str(d / "text.txt"), "-c", "16", "--chunks", "1",
                     "-q", "-t", "1", *mode]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("key,value,vtype,needle", [
    ("llama.block_count", "two", GGUFValueType.STRING, "llama.block_count is 'two' (str); expected an integer >= 1"),
    ("llama.attention.head_count", 0, GGUFValueType.UINT32, "llama.attention.head_count is 0 (int); expected an integer >= 1"),
    ("llama.attention.head_count_kv", 0, GGUFValueType.UINT32, "head_count_kv is 0"),
    ("llama.embedding_length", 3.5, GGUFValueType.FLOAT32, "llama.embedding_length is 3.5 (float)"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, GGUFValueType.FLOAT32, "expected a finite number > 0"),
    ("llama.rope.freq_base", float("nan"), GGUFValueType.FLOAT32, "llama.rope.freq_base is nan"),
    ("llama.context_length", "long", GGUFValueType.STRING, "llama.context_length is 'long'"),
])
def test_bad_header_values_are_one_line(files, tmp_path, capsys, key, value, vtype, needle):
    _d, dense = files
    bad = tmp_path / "bad_header.gguf"
    write_model_copy(GGUFModel(dense), bad, set_keys=[KV(key, value, vtype)])
    rc = main(["ppl", "-m", str(bad), "-f", str(files[0] / "text.txt"), "-c", "16", "-q", "-t", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
