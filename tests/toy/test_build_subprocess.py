"""`seeddelta build` through a real subprocess: bad input, and what a fresh interpreter imports."""

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


def test_a_plain_build_never_imports_torch(tmp_path):
    """torch costs a build ~1.3 s of start-up and ~190 MiB of resident memory (measured on SmolLM2, issue
    12); a build without variant and with few metric tokens needs none of it, and a variant module
    imported at the top of the builder once brought it back unnoticed."""
    from seeddelta.testing.synthetic_gguf import make_llama_gguf

    m = make_llama_gguf(tmp_path / "in.gguf", n_layer=2, n_embd=64, n_ff=96, ffn_dtype="Q4_1", seed=1)
    code = ("import sys\nfrom seeddelta.cli import main\n"
            f"assert main(['build', '-i', {m.path!r}, '-o', {str(tmp_path / 'o.gguf')!r}, '--K', '8', '--base', "
            "'--eval-cols', '16', '--eval-x', '4', '-q', '-t', '2']) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
