"""Shared fixtures (plain helpers and constants live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ROOT  # noqa: F401  transitional: tests/test_evaluation.py still imports ROOT from here


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory) -> Path:
    """One synthetic cache for the whole session (generation is the slow part)."""
    return tmp_path_factory.mktemp("synthetic_cache")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory) -> Path:
    """A tiny randomly initialised model saved in Stable Diffusion 2 layout (4-channel UNet)."""
    from lightning_modules.standin_folder import save_tiny_sd2_folder

    return save_tiny_sd2_folder(tmp_path_factory.mktemp("tiny_sd2") / "sd2")
