"""How `make test` spreads the tests over pytest-xdist workers (conftest.py): one file per unit of work,
except the files that share the CI regress run, which must be one unit (else one worker waits on the
run's lock while the other computes it)."""

from __future__ import annotations

from pathlib import Path

import conftest

ROOT = Path(conftest.__file__).parent


def test_the_files_sharing_the_ci_regress_run_exist_and_read_it():
    # A renamed file would silently fall back to its own unit: the mapping must name real files that use the run.
    assert len(conftest.SHARED_RUN_SCOPES) >= 2
    for path in conftest.SHARED_RUN_SCOPES:
        assert "regress_ci import" in (ROOT / path).read_text(encoding="utf-8"), path


def test_the_shared_files_are_one_unit_and_every_other_file_its_own():
    golden, tiny = sorted(conftest.SHARED_RUN_SCOPES)
    assert conftest.unit_of_work(f"{golden}::test_a") == conftest.unit_of_work(f"{tiny}::test_b[x-1]")
    assert conftest.unit_of_work("tests/toy/test_eval.py::test_a") == "tests/toy/test_eval.py"
    assert conftest.unit_of_work("tests/toy/test_eval.py::test_a") == conftest.unit_of_work("tests/toy/test_eval.py::T::b")
    assert conftest.unit_of_work("tests/toy/test_eval.py::a") != conftest.unit_of_work("tests/toy/test_dataset.py::a")
