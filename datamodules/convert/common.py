"""Helpers shared by the dataset converters: reading raw files, keys, crops, resizes and depth scales."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

# Depth scales tried in order for float depth sources: the finest one whose 16-bit range holds the sample.
DEPTH_SCALE_LADDER = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)
KB_CROP = (352, 1216)  # KITTI benchmark crop (height, width)


class SkipInput(Exception):
    """An input that cannot be converted; its reason is reported and the run goes on."""


def make_key(*parts: str) -> str:
    """A WebDataset-safe sample key: parts joined by '-', anything but letters, digits, '_' and '-' replaced."""
    return "-".join(re.sub(r"[^A-Za-z0-9_-]", "_", str(p)) for p in parts)


def require(path: Path, what: str) -> Path:
    """`path` if it is a file, else skip the input naming what is missing."""
    if not path.is_file():
        raise SkipInput(f"missing {what}: {path}")
    return path


def read_rgb(path: Path) -> np.ndarray:
    """Any 8-bit image file as uint8 HxWx3 (grayscale and RGBA converted)."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def read_png_units(path: Path) -> np.ndarray:
    """A single-channel (8- or 16-bit) PNG as integer array HxW, values unchanged."""
    with Image.open(path) as image:
        array = np.array(image)
    if array.ndim != 2:
        raise SkipInput(f"{path}: expected a single-channel depth PNG, got shape {array.shape}")
    return array.astype(np.int64)


def read_exr_rgb(path: Path) -> np.ndarray:
    """The R, G, B channels of an OpenEXR file as float32 HxWx3."""
    try:
        import OpenEXR
    except ImportError as err:  # optional dependency
        raise RuntimeError("reading EXR needs the OpenEXR package: pip install -e '.[convert]'") from err
    with OpenEXR.File(str(path)) as exr:
        channels = exr.channels()
        if "RGB" in channels:
            return np.asarray(channels["RGB"].pixels, dtype=np.float32)
        if all(c in channels for c in "RGB"):
            return np.stack([np.asarray(channels[c].pixels, dtype=np.float32) for c in "RGB"], axis=-1)
    raise SkipInput(f"{path}: no R, G, B channels (has {sorted(channels)})")


def check_size(path: Path, array: np.ndarray, shape: tuple[int, int]) -> None:
    """Skip the input unless `array` is `shape` (height, width)."""
    if array.shape[:2] != shape:
        raise SkipInput(f"{path}: size {array.shape[:2]} differs from {shape}")


def kb_crop_box(height: int, width: int) -> tuple[int, int]:
    """(top, left) of the KITTI benchmark crop: bottom-aligned, horizontally centred."""
    crop_h, crop_w = KB_CROP
    if height < crop_h or width < crop_w:
        raise SkipInput(f"image {height}x{width} is smaller than the KITTI benchmark crop {crop_h}x{crop_w}")
    return height - crop_h, (width - crop_w) // 2


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean HxW that is True inside rows box[0]:box[1], columns box[2]:box[3]."""
    mask = np.zeros(shape, dtype=bool)
    mask[box[0] : box[1], box[2] : box[3]] = True
    return mask


def fit_depth_scale(depth: np.ndarray, valid: np.ndarray) -> float:
    """The finest ladder scale (metres per unit) at which every valid depth fits 16 bits."""
    top = float(depth[valid].max(initial=0.0))
    for scale in DEPTH_SCALE_LADDER:
        if round(top / scale) <= np.iinfo(np.uint16).max:
            return scale
    raise SkipInput(f"depth {top:.1f} m is beyond every supported depth scale")


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of uint8 RGB, antialiased when shrinking (Pillow widens the filter support)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.array(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-aligned nearest neighbour: output pixel i reads input floor((i + 0.5) * in / out)."""
    rows = np.minimum(((np.arange(height) + 0.5) * array.shape[0] / height).astype(int), array.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * array.shape[1] / width).astype(int), array.shape[1] - 1)
    return array[rows][:, cols]


def resize_normals(normals: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased) resize of HxWx3 float normals, renormalised; zero vectors stay zero."""
    if normals.shape[:2] == (height, width):
        return normals
    channels = [
        np.array(Image.fromarray(np.ascontiguousarray(normals[..., c], dtype=np.float32)).resize(
            (width, height), Image.BILINEAR))
        for c in range(3)
    ]  # fmt: skip
    return normalise(np.stack(channels, axis=-1))


def normalise(normals: np.ndarray) -> np.ndarray:
    """Unit vectors along the last axis; vectors shorter than 1e-6 (and NaN) become zero."""
    normals = np.nan_to_num(normals.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.where(length > 1e-6, normals / np.maximum(length, 1e-6), 0.0).astype(np.float32)


def png_normals(path: Path) -> np.ndarray:
    """An 8-bit normals PNG as float n = value / 255 x 2 - 1 (not renormalised), HxWx3."""
    return read_rgb(path).astype(np.float32) / 255 * 2 - 1
