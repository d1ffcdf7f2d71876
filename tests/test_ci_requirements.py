"""conftest.require and the ``requires`` marker: a missing requirement skips a test, and fails it under CI.

Each case runs pytest in a subprocess on a small test file beside a copy of tests/conftest.py, once without
and once with ``CI=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CASES = '''
import pytest

pytestmark = pytest.mark.requires(True, "nothing")


@pytest.mark.requires(False, "the package lowbit_no_such_package")
def test_marked() -> None:
    raise AssertionError("a test whose requirement is missing must not run")


def test_fixture(require) -> None:
    require(False, "the folder /no/such/shared/data")
    raise AssertionError("a test whose requirement is missing must not run")


@pytest.mark.requires(True, "present")
def test_present(require) -> None:
    require(1, "present too")
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # rootdir here, not the project's settings
    (tmp_path / "test_cases.py").write_text(CASES)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "test_cases.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("ci", [None, ""])
def test_missing_requirements_skip_outside_ci(tmp_path: Path, ci: str | None) -> None:
    run = _run(tmp_path, ci)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 2 skipped" in run.stdout, run.stdout
    assert "missing: the package lowbit_no_such_package" in run.stdout
    assert "missing: the folder /no/such/shared/data" in run.stdout


def test_missing_requirements_fail_under_ci(tmp_path: Path) -> None:
    run = _run(tmp_path, "1")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "skipped" not in run.stdout, run.stdout
    # The marker fails the test's setup (an error), require() inside the fixture or test fails the test.
    assert "1 failed, 1 passed, 1 error" in run.stdout, run.stdout
    assert "missing: the package lowbit_no_such_package (CI is set" in run.stdout
    assert "missing: the folder /no/such/shared/data (CI is set" in run.stdout
    assert "must not run" not in run.stdout


def test_any_skip_fails_the_run_under_ci(tmp_path: Path) -> None:
    """A plain ``pytest.skip`` (not the marker) passes outside CI and fails the session under it."""
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_skip.py").write_text("import pytest\n\n\ndef test_a() -> None:\n    pytest.skip('later')\n\n\n"
                                         "def test_b() -> None:\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    for ci, code in ((None, 0), ("1", 1)):
        run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_skip.py"], cwd=tmp_path,
                             env={**env, **({"CI": ci} if ci else {})}, capture_output=True, text=True, timeout=120)
        assert run.returncode == code, run.stdout + run.stderr
        assert "1 passed, 1 skipped" in run.stdout
        assert ("test(s) were skipped: failing the run" in run.stdout) == (ci is not None)
