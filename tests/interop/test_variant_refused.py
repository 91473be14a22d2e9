"""A file of the variant sdq is refused by every llama.cpp we can run, never computed as something else.

* the original fork (`llama-perplexity` of frudas24/llama.cpp) when `SEEDDELTA_ORIGINAL_BIN` names its
  build/bin directory: with and without `--seeddelta`, dense weights stripped or kept, it stops at
  load time with "wrong number of tensors" (its loader knows no `sdq_*` tensor);
* stock llama.cpp through llama-cpp-python, when importable: it fails to load the model.

Skipped, with the reason, when neither is available. The dense export of a variant (what stock
llama.cpp can run) is `seeddelta materialize`'s job.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from seeddelta.cli import main
from seeddelta.testing.synthetic_gguf import make_llama_gguf

ORIGINAL_BIN = os.environ.get("SEEDDELTA_ORIGINAL_BIN", "")


@pytest.fixture(scope="module")
def variant_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("variant_interop")
    m = make_llama_gguf(d / "dense.gguf", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, vocab=300, seed=1)
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = {}
    for name, flags in (("stripped", ["--strip-dense"]), ("kept", [])):
        out[name] = d / f"{name}.gguf"
        assert main(["build", "-i", m.path, "-o", str(out[name]), "--variant", "sdq", "--K", "2", "-q", "-t", "1",
                     *flags]) == 0
    return d, out


@pytest.mark.skipif(not (ORIGINAL_BIN and Path(ORIGINAL_BIN, "llama-perplexity").is_file()),
                    reason="SEEDDELTA_ORIGINAL_BIN does not name the original fork's build/bin (llama-perplexity)")
@pytest.mark.parametrize("which", ["stripped", "kept"])
@pytest.mark.parametrize("flag", [[], ["--seeddelta"]], ids=["plain", "seeddelta"])
def test_the_original_refuses_a_variant_file(variant_files, which, flag):
    d, out = variant_files
    run = subprocess.run([str(Path(ORIGINAL_BIN, "llama-perplexity")), "-m", str(out[which]), "-f",
                          str(d / "text.txt"), "-c", "64", "--chunks", "1", "-t", "1", *flag],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "wrong number of tensors" in run.stderr + run.stdout
    assert "Final estimate" not in run.stdout  # nothing was computed


def test_stock_llama_cpp_refuses_a_variant_file(variant_files):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional extra: interop)")
    _d, out = variant_files
    for path in out.values():
        with pytest.raises(ValueError):
            llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
