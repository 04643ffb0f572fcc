"""Fixtures for the recipe tests."""

from pathlib import Path

import pytest

from recipe_helpers import make_image_folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 easy classes, 24 train / 8 val PNG images each, 16x16."""
    return make_image_folder(tmp_path_factory.mktemp("tiny-data"))
