"""Helpers for the converter tests: write tiny raw files, read shards back."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.shard_format import decode_sample


def read_samples(folder: Path, pattern: str = "*.tar") -> dict[str, dict[str, Any]]:
    """Every sample of the shards in `folder`, decoded, by key."""
    samples = {}
    for path in sorted(folder.glob(pattern)):
        raw: dict[str, dict[str, Any]] = {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                raw.setdefault(key, {"__key__": key, "__url__": str(path)})[name] = tar.extractfile(member).read()
        samples.update({key: decode_sample(r) for key, r in raw.items()})
    return samples


def save_png(path: Path, array: np.ndarray) -> Path:
    """Write uint8 (gray or RGB) or uint16 (gray) PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_jpg(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB JPEG (quality 95), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95)
    return path


def corrupt(path: Path) -> Path:
    """Write bytes that no image/HDF5/npy reader accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a valid file" * 3)
    return path
