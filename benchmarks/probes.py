"""Probes of issue 14: bad inputs and faults a new user meets, each run as a fresh `python -m seeddelta`
process, with what a user sees measured — exit status, stderr lines (and whether a traceback
appeared), inputs unchanged (sha256 before/after), nothing left behind (no file added to the work
directory but the outputs of a successful run), seconds until the answer.

Run against any checkout: `python -m benchmarks.probes [--code DIR] [--out FILE.md] [--label NAME]`;
`--code` puts that checkout's `seeddelta` first on PYTHONPATH (an older version, to compare). The
fixtures (a synthetic llama, SeedΔ files built and damaged with this checkout's code) are data, the
same for every version probed. The tests in tests/toy (test_guards, test_seeddelta_validation,
test_no_silent_coercion, test_cli_surface) assert the same behaviour; this script prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Probe:
    id: str
    what: str
    argv: list[str]
    expect_ok: bool = False  # exit 0 is the right answer (a warning is expected instead)
    expect_rc: int = 2  # the right exit status of a refusal (bad input: 2; a signal: 128 + its number)
    outputs: tuple[str, ...] = ()  # files a successful run may add
    runner: Callable[[Probe, Path, dict[str, str]], Result] | None = None
    needle: str = ""  # a text the answer should contain (a warning or the error)


@dataclass
class Result:
    rc: int | None
    stderr: str
    seconds: float
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(d: Path) -> dict[str, str]:
    return {p.name: (_sha(p) if p.is_file() and not p.is_symlink() else "link") for p in d.iterdir()}


def _fixtures(d: Path) -> None:
    from gguf import GGUFValueType

    from seeddelta.cli import main
    from seeddelta.gguf_format.imatrix_file import write_imatrix
    from seeddelta.gguf_format.reader import GGUFModel
    from seeddelta.gguf_format.writer import KV, write_model_copy
    from seeddelta.testing.synthetic_gguf import make_llama_gguf

    m = make_llama_gguf(d / "model.gguf", n_layer=2, n_embd=32, n_ff=64, n_head=2, n_head_kv=1, vocab=300, seed=3)
    (d / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    assert main(["build", "-i", m.path, "-o", str(d / "sd.gguf"), "--K", "4", "--base", "--row-scale", "-q",
                 "-t", "1"]) == 0
    sd = GGUFModel(d / "sd.gguf")

    def damage(name: str, tensor: str, change: Callable[[np.ndarray], None]) -> None:
        a = np.array(sd.tensors[tensor].data, copy=True)
        change(a)
        write_model_copy(sd, d / name, drop_tensors={tensor}, add_tensors=[(tensor, a)])

    damage("bad_idx.gguf", "blk.1.ffn_up.d_idx", lambda a: a.__setitem__((5, 2), 32))
    damage("bad_negidx.gguf", "blk.0.ffn_down.d_idx", lambda a: a.__setitem__((3, 0), -1))
    damage("bad_perm.gguf", "blk.0.ffn_gate.base_perm1", lambda a: a.__setitem__((0, 1), a[0, 0]))
    damage("bad_nan.gguf", "blk.0.ffn_up.d_val", lambda a: a.__setitem__((7, 1), np.nan))
    damage("bad_scale.gguf", "blk.1.ffn_gate.d_row_scale", lambda a: a.__setitem__(4, np.inf))
    dense = GGUFModel(m.path)
    write_model_copy(dense, d / "hdr_string.gguf", set_keys=[KV("llama.block_count", "two", GGUFValueType.STRING)])
    write_model_copy(dense, d / "hdr_heads0.gguf", set_keys=[KV("llama.attention.head_count", 0, GGUFValueType.UINT32)])
    sums = {f"blk.{i}.{k}.weight": np.ones(64 if k == "ffn_down" else 32, np.float32)
            for i in range(2) for k in ("ffn_gate", "ffn_up", "ffn_down")}
    write_imatrix(d / "imatrix.gguf", sums, dict.fromkeys(sums, 16), ["x"], 1, 16)
    counts = dict.fromkeys(sums, 16)
    counts["blk.1.ffn_up.weight"] = 0
    write_imatrix(d / "imatrix_zero.gguf", sums, counts, ["x"], 1, 16)
    line = '{"id": "a", "task": "t", "prompt": "p: ", "answer": "x"}\n'
    (d / "pack.jsonl").write_text(line + line.replace('"a"', '"b"'))
    (d / "pack_type.jsonl").write_text(line + '{"id": "b", "task": "t", "prompt": "p", "answer": 7}\n')
    (d / "pack_dup.jsonl").write_text(line + line)
    (d / "report.json").write_text('{"weights": []}')
    os.link(d / "text.txt", d / "text_hardlink.txt")


_SLOW_WRITE = """
import signal, sys, time, gguf
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)
real = gguf.GGUFWriter.write_tensors_to_file
def slow(self, *a, **k):
    real(self, *a, **k)
    print("written", flush=True)
    time.sleep(120)
gguf.GGUFWriter.write_tensors_to_file = slow
from seeddelta.cli import main
raise SystemExit(main(sys.argv[1:]))
"""

_FULL_DISK = """
import errno, os, sys
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full
from seeddelta.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "seeddelta", *argv]


def _plain(probe: Probe, d: Path, env: dict[str, str]) -> Result:
    t0 = time.perf_counter()
    proc = subprocess.run(_cmd(probe.argv), cwd=d, env=env, capture_output=True, text=True, timeout=900)
    return Result(proc.returncode, proc.stderr, time.perf_counter() - t0)


def _wrapped(code: str) -> Callable[[Probe, Path, dict[str, str]], Result]:
    def run(probe: Probe, d: Path, env: dict[str, str]) -> Result:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, *probe.argv], cwd=d, env=env, capture_output=True,
                              text=True, timeout=900)
        return Result(proc.returncode, proc.stderr, time.perf_counter() - t0)
    return run


def _signal_during_write(sig: int, then: list[str] | None = None) -> Callable[[Probe, Path, dict[str, str]], Result]:
    """Start a build whose write pauses after the tensors, send `sig`; with `then`, run that command next
    (a later run that meets the temp file a killed run left)."""
    def run(probe: Probe, d: Path, env: dict[str, str]) -> Result:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, *probe.argv], cwd=d, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line != "written\n":
            proc.kill()
            _, err = proc.communicate()
            return Result(proc.returncode, f"(never reached the write) {err}", time.perf_counter() - t0)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:  # the signal did not stop it
            proc.kill()
            _, err = proc.communicate()
            rc, err = None, f"(still running 60 s after the signal) {err}"
        if then is not None:
            later = subprocess.run(_cmd(then), cwd=d, env=env, capture_output=True, text=True, timeout=900)
            return Result(later.returncode, later.stderr, time.perf_counter() - t0)
        return Result(rc, err, time.perf_counter() - t0)
    return run


def _help(probe: Probe, d: Path, env: dict[str, str]) -> Result:
    code = ("import sys, time; t = time.perf_counter(); from seeddelta.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(f'torch imported: {\"torch\" in sys.modules}', file=sys.stderr)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=d, env=env, capture_output=True, text=True, timeout=300)
    return Result(proc.returncode, proc.stderr, time.perf_counter() - t0)


def probes() -> list[Probe]:
    ppl = ["ppl", "-m", "model.gguf", "-f", "text.txt", "-c", "16", "--chunks", "2", "-t", "1"]
    return [
        # 1. no output replaces an input or another output
        Probe("G1", "`imatrix -o` onto `-m`", ["imatrix", "-m", "model.gguf", "-f", "text.txt", "-c", "16", "-o", "model.gguf"]),
        Probe("G2", "`imatrix -o` onto `-f`", ["imatrix", "-m", "model.gguf", "-f", "text.txt", "-c", "16", "-o", "text.txt"]),
        Probe("G3", "`build --report-json` onto `-i`", ["build", "-i", "model.gguf", "-o", "o.gguf", "--report-json", "model.gguf", "-q"]),
        Probe("G4", "`build -o` onto `--imatrix`", ["build", "-i", "model.gguf", "-o", "imatrix.gguf", "--imatrix", "imatrix.gguf", "-q"]),
        Probe("G5", "`build --report-json` = `-o`", ["build", "-i", "model.gguf", "-o", "o.gguf", "--report-json", "o.gguf", "-q"]),
        Probe("G6", "`ppl --json` onto `-m`", [*ppl, "--json", "model.gguf"]),
        Probe("G7", "`ppl --json` onto `-f` through a hard link", [*ppl, "--json", "text_hardlink.txt"]),
        Probe("G8", "`kld --json` onto `--base`", ["kld", "--base", "model.gguf", "-m", "sd.gguf", "-f", "text.txt", "-c", "16", "--json", "model.gguf"]),
        Probe("G9", "`greedy --json` onto `--pack`", ["greedy", "-m", "model.gguf", "--pack", "pack.jsonl", "--json", "pack.jsonl"]),
        Probe("G10", "`ppl --json` into a missing directory", [*ppl, "--json", "no/such/dir/p.json"]),
        Probe("G11", "`build --report-json` into a missing directory", ["build", "-i", "model.gguf", "-o", "o.gguf", "--report-json", "no/r.json", "-q"]),
        # 2. a SeedΔ file is validated before it runs
        Probe("V1", "`ppl` on a d_idx = n_in", ["ppl", "-m", "bad_idx.gguf", "-f", "text.txt", "-c", "16", "-t", "1"]),
        Probe("V2", "`ppl --sparse` on a d_idx = -1", ["ppl", "-m", "bad_negidx.gguf", "-f", "text.txt", "-c", "16", "--sparse", "-t", "1"]),
        Probe("V3", "`kld` on a base_perm1 that is not a permutation", ["kld", "--base", "model.gguf", "-m", "bad_perm.gguf", "-f", "text.txt", "-c", "16"]),
        Probe("V4", "`greedy` on NaN in d_val", ["greedy", "-m", "bad_nan.gguf", "--pack", "pack.jsonl"]),
        Probe("V5", "`imatrix --sparse` on Inf in d_row_scale", ["imatrix", "-m", "bad_scale.gguf", "-f", "text.txt", "-c", "16", "--sparse", "-o", "im.gguf"]),
        Probe("V6", "`sweep` on a d_idx = n_in", ["sweep", "-m", "bad_idx.gguf", "-f", "text.txt", "-c", "16", "--layers", "0"]),
        Probe("V7", "`inspect --check` on a base_perm1 that is not a permutation", ["inspect", "bad_perm.gguf", "--check"],
              expect_rc=1),
        Probe("V8", "`ppl` on a string block_count", ["ppl", "-m", "hdr_string.gguf", "-f", "text.txt", "-c", "16"]),
        Probe("V9", "`ppl` on head_count 0", ["ppl", "-m", "hdr_heads0.gguf", "-f", "text.txt", "-c", "16"]),
        # 3. no silent coercion
        Probe("C1", "`build --K 5000` (n_in 32/64): warns, stores the K used", ["build", "-i", "model.gguf", "-o", "k.gguf", "--K", "5000", "-q"],
              expect_ok=True, outputs=("k.gguf",), needle="exceeds"),
        Probe("C2", "`build --layers \"1-0\"`: kept as 0-1, says so", ["build", "-i", "model.gguf", "-o", "l.gguf", "--layers", "1-0", "-q"],
              expect_ok=True, outputs=("l.gguf",), needle="reversed"),
        Probe("C3", "`build --layers \"\"`", ["build", "-i", "model.gguf", "-o", "l.gguf", "--layers", "", "-q"]),
        Probe("C4", "`ppl -c 300` beyond the model's 256", ["ppl", "-m", "model.gguf", "-f", "text.txt", "-c", "300", "--chunks", "1", "-t", "1"],
              expect_ok=True, needle="beyond"),
        Probe("C5", "`ppl --chunks 0`", ["ppl", "-m", "model.gguf", "-f", "text.txt", "-c", "16", "--chunks", "0"]),
        Probe("C6", "`ppl -t -1`", ["ppl", "-m", "model.gguf", "-f", "text.txt", "-c", "16", "--chunks", "1", "-t", "-1"]),
        Probe("C7", "`greedy --pack` with a number as answer", ["greedy", "-m", "model.gguf", "--pack", "pack_type.jsonl"]),
        Probe("C8", "`greedy --pack` with a repeated id", ["greedy", "-m", "model.gguf", "--pack", "pack_dup.jsonl"]),
        Probe("C9", "`build --imatrix` with a zero count", ["build", "-i", "model.gguf", "-o", "z.gguf", "--imatrix", "imatrix_zero.gguf", "-q"]),
        Probe("C10", "`toy` 200000 x 200000", ["toy", "--pattern", "identity", "--n-in", "200000", "--n-out", "200000"]),
        Probe("C11", "a full disk (`policy export`, ENOSPC)", ["policy", "export", "report.json", "-o", "p.json"], runner=_wrapped(_FULL_DISK)),
        # 4. interrupted runs leave nothing behind
        Probe("I1", "SIGTERM while `build` writes", ["build", "-i", "model.gguf", "-o", "t.gguf", "-q"],
              expect_rc=128 + signal.SIGTERM, runner=_signal_during_write(signal.SIGTERM)),
        Probe("I2", "SIGINT while `build` writes", ["build", "-i", "model.gguf", "-o", "t.gguf", "-q"],
              expect_rc=128 + signal.SIGINT, runner=_signal_during_write(signal.SIGINT)),
        Probe("I3", "SIGKILL while `build` writes, then `build` again", ["build", "-i", "model.gguf", "-o", "t.gguf", "-q"],
              expect_ok=True, outputs=("t.gguf",), needle="temporary file",
              runner=_signal_during_write(signal.SIGKILL, ["build", "-i", "model.gguf", "-o", "t.gguf", "-q"])),
        Probe("I4", "`demo --K-gate 0`", ["demo", "--K-gate", "0", "--out", "demo_out", "--skip-toy"]),
        # 5/6. fast answers
        Probe("H1", "`seeddelta --help`", [], expect_ok=True, runner=_help, needle="torch imported: False"),
    ]


def _run_all(code: str | None, only: set[str] | None) -> list[tuple[Probe, Result]]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    if code:
        env["PYTHONPATH"] = code
    out = []
    for probe in probes():
        if only and probe.id not in only:
            continue
        with tempfile.TemporaryDirectory(prefix="seeddelta-probe-") as td:
            d = Path(td)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                _fixtures(d)
            before = _state(d)
            res = (probe.runner or _plain)(probe, d, env)
            after = _state(d)
            res.added = sorted(set(after) - set(before))
            res.changed = sorted(n for n in before if after.get(n) != before[n])
        out.append((probe, res))
        print(f"{probe.id:<4} rc={res.rc} {res.seconds:6.1f}s  {_first_line(res.stderr)[:120]}", file=sys.stderr, flush=True)
    return out


def _first_line(text: str, needle: str = "") -> str:
    """The line a user reads: the one holding `needle`, else the error line, else the last one."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for want in (needle, "error", "Error"):
        hit = [ln for ln in lines if want and want in ln]
        if hit:
            return hit[0]
    return lines[-1] if lines else ""


def verdict(probe: Probe, rc: int | None, lines: int, traceback: bool, said: bool, changed: bool, left: bool) -> bool:
    """The answer a user should get: the right exit status, one line for a refusal (or the warning for a
    run that goes ahead), no traceback, the inputs unchanged and nothing left behind."""
    right_exit = rc == (0 if probe.expect_ok else probe.expect_rc)
    one_line = probe.expect_ok or probe.expect_rc == 1 or lines == 1
    return right_exit and one_line and not traceback and said and not changed and not left


def _judge(probe: Probe, res: Result) -> dict[str, str]:
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    traceback = any("Traceback" in ln for ln in lines)
    left = [a for a in res.added if a not in probe.outputs or not probe.expect_ok]
    said = probe.needle in res.stderr if probe.needle else True
    ok = verdict(probe, res.rc, len(lines), traceback, said, bool(res.changed), bool(left))
    return {
        "exit": str(res.rc),
        "answer": ("traceback" if traceback else f"{len(lines)} line(s)") + ("" if said else ", silent"),
        "inputs": "changed: " + ", ".join(res.changed) if res.changed else "unchanged",
        "left": ", ".join(left) if left else "nothing",
        "seconds": f"{res.seconds:.1f}",
        "ok": "yes" if ok else "NO",
        "line": _first_line(res.stderr, probe.needle).replace("|", "\\|")[:160],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="probes")
    ap.add_argument("--code", default=None, help="checkout whose seeddelta is probed (default: this one)")
    ap.add_argument("--label", default="this checkout", help="name of the version in the output")
    ap.add_argument("--json", default=None, help="write the raw results as JSON")
    ap.add_argument("--only", default=None, help="comma-separated probe ids")
    args = ap.parse_args(argv if argv is not None else [])
    results = _run_all(args.code, set(args.only.split(",")) if args.only else None)
    rows = [{"id": p.id, "what": p.what, **_judge(p, r)} for p, r in results]
    print(f"| probe | {args.label}: exit | answer | inputs | left behind | s | ok | last stderr line |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['id']} {r['what']} | {r['exit']} | {r['answer']} | {r['inputs']} | {r['left']} | {r['seconds']} | "
              f"{r['ok']} | {r['line']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return 0 if all(r["ok"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
