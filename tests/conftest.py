"""Shared pytest configuration: ``--run-slow`` enables tests marked ``slow``."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (end-to-end training, export); CI passes it")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The ``../shared/data`` folder beside the checkout; skips where it is absent (users' machines)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs {SHARED_DATA} (exists in the project's CI and dev machines, not in a user's checkout)")
    return SHARED_DATA


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
