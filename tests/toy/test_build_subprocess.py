"""`seeddelta build` bad input through a real subprocess (slow: a fresh interpreter imports torch)."""

from __future__ import annotations

import subprocess
import sys


def test_bad_input_through_a_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "seeddelta", "build", "-i", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"seeddelta build: error: input file not found: {tmp_path / 'missing.gguf'}"]
    assert proc.stdout == ""


def test_output_equal_to_input_refused_by_a_subprocess_input_untouched(tmp_path):
    from seeddelta.testing.files import file_fingerprint
    from seeddelta.testing.synthetic_gguf import make_llama_gguf

    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=1, seed=1)
    before = (file_fingerprint(m.path), (tmp_path / "in.gguf").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "seeddelta", "build", "-i", m.path, "-o", m.path],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "is the input" in proc.stderr
    assert (file_fingerprint(m.path), (tmp_path / "in.gguf").read_bytes()) == before
