"""Shared fixtures: the real data and tiny model in ../shared, and quantized outputs reused across tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA_DIR = Path(os.environ.get("LOWBIT_DATA_DIR", SHARED / "data"))
STORIES = SHARED / "models" / "stories260K"

# Every default data source points at the local copy (CI and our machines are offline).
os.environ.setdefault("LOWBIT_DATA_DIR", str(DATA_DIR))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return STORIES


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def quantized_stories(tmp_path_factory: pytest.TempPathFactory):
    """Quantize stories260K once per preset per session: ``quantized_stories(name) -> (dir, result)``."""
    from lowbit.quantize.pipeline import quantize_model

    cache: dict[str, tuple[Path, object]] = {}

    def get(recipe: str) -> tuple[Path, object]:
        if recipe not in cache:
            out = tmp_path_factory.mktemp("q") / recipe
            result = quantize_model(STORIES, recipe, out, samples=8, calib_seqlen=64, seed=0, progress=False)
            cache[recipe] = (out, result)
        return cache[recipe]

    return get
