"""`seeddelta tiny …` through the CLI: data files, one-line user errors with exit status 2."""

from __future__ import annotations

from seeddelta.assets import TINY_TEST_PACK, TINY_VAL_TEXT
from seeddelta.cli import main


def test_tiny_data_writes_the_shipped_files(tmp_path, capsys):
    assert main(["tiny", "data", "--outdir", str(tmp_path)]) == 0
    assert (tmp_path / "val.txt").read_bytes() == TINY_VAL_TEXT.read_bytes()
    assert (tmp_path / "test.jsonl").read_bytes() == TINY_TEST_PACK.read_bytes()
    assert "wrote" in capsys.readouterr().out


def test_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    rc = main(["tiny", "export", "--ckpt", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "checkpoint not found" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()


def test_training_refuses_to_overwrite_a_run_without_resume(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    rc = main(["tiny", "train", "--run-dir", str(tmp_path), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--resume" in err


def test_unknown_training_option_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"learning_rate": 1}')
    rc = main(["tiny", "train", "--run-dir", str(tmp_path / "r"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "learning_rate" in err
