"""Shared test fixtures.

The real checkpoints the loader must accept live outside the repository, in the shared
folder beside the clone: ``<repo>/../shared/fixtures/associativeconv`` (CI has the same
layout). A test that needs them fails -- it never skips -- when the folder is missing, so a
run without them cannot pass by testing less.
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "associativeconv"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (the one holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The folder of real CSG checkpoints; fails the requesting test when it is missing."""
    if not FIXTURES_DIR.is_dir():
        pytest.fail(
            f"checkpoint fixtures not found at {FIXTURES_DIR}: tests that read real checkpoints "
            f"need the shared folder beside the repository (<repo>/../shared/fixtures/"
            f"associativeconv); clone the repository next to it", pytrace=False)
    if not any(FIXTURES_DIR.glob("*.t7")):
        pytest.fail(f"checkpoint fixtures folder {FIXTURES_DIR} holds no *.t7 files",
                    pytrace=False)
    return FIXTURES_DIR
