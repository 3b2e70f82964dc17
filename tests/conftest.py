"""Shared fixtures (plain helpers and constants live in tests/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def shard_cache(tmp_path_factory) -> Path:
    """One synthetic cache for the whole session (generation is the slow part)."""
    return tmp_path_factory.mktemp("synthetic_cache")


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory) -> Path:
    """A tiny randomly initialised model saved in Stable Diffusion 2 layout (4-channel UNet)."""
    from lightning_modules.standin_folder import save_tiny_sd2_folder

    return save_tiny_sd2_folder(tmp_path_factory.mktemp("tiny_sd2") / "sd2")


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("single_thread")`): tiny convolutions gain
    nothing from threads, and on a busy machine thread contention makes them about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
