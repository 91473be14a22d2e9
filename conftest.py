"""Root pytest configuration: tier markers from directories, hypothesis profiles, seeds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("PYTHONHASHSEED", "0")
# OpenMP threads sleep instead of spinning when idle (before torch loads): tests share the cores with
# each other (pytest-xdist) and with other work; see seeddelta.resources
from seeddelta.resources import prepare_environment  # noqa: E402

prepare_environment()

# The directory implies the tier, so `pytest -m toy` cannot miss a file someone forgot to mark.
_TIER_BY_DIR = {"toy": "toy", "tiny": "tiny", "golden": "golden", "real": "real", "interop": "interop"}

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("nightly", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent / "tests"
    for item in items:
        try:
            rel = Path(str(item.path)).resolve().relative_to(root.resolve())
        except ValueError:
            continue
        tier = _TIER_BY_DIR.get(rel.parts[0]) if rel.parts else None
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


# Files that share one expensive run (seeddelta.testing.regress_ci) are one unit of work for pytest-xdist:
# spread over two workers, one would wait on the run's lock while the other computes it.
SHARED_RUN_SCOPES = {"tests/golden/test_regress_report.py": "regress-ci", "tests/tiny/test_regress.py": "regress-ci"}


def unit_of_work(nodeid: str) -> str:
    """The test's file, or the shared run's name for the files that share one."""
    path = nodeid.split("::", 1)[0]
    return SHARED_RUN_SCOPES.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` (what `make test` uses): one file per unit of work, so module fixtures are
    computed once, with the files of SHARED_RUN_SCOPES in one unit. (xdist_group marks added from a
    hook are ignored by pytest-xdist 3.8 on pytest 9.2, so --dist loadgroup cannot express this.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of_work(nodeid)

    return SharedRunFileScheduling(config, log)


def pytest_report_header(config: pytest.Config) -> str:
    return f"SEEDDELTA_TEST_SEED={os.environ.get('SEEDDELTA_TEST_SEED', '0')}"


@pytest.fixture(autouse=True)
def _unit_cache_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """sweep and scan cache units by default under ~/.cache: each test gets an empty cache of its own
    instead (never the user's, never another test's results)."""
    monkeypatch.setenv("SEEDDELTA_CACHE", str(tmp_path_factory.mktemp("unit-cache")))


@pytest.fixture
def seed() -> int:
    """Seed for tests that draw random data; override with SEEDDELTA_TEST_SEED."""
    return int(os.environ.get("SEEDDELTA_TEST_SEED", "0"))


@pytest.fixture
def snapshot_json(snapshot):
    """syrupy snapshot stored as one JSON file per snapshot under tests/golden/__snapshots__/."""
    from syrupy.extensions.json import JSONSnapshotExtension

    return snapshot.use_extension(JSONSnapshotExtension)
