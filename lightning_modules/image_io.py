"""Reading images of any common mode and writing predictions in the output conventions of docs/method.md §5.6.

Every writer writes atomically (`atomic_write`: a temporary name in the same folder, then `os.replace`), and the
file names of each writer are available without writing (`depth_files`, `normals_files`, `uncertainty_file`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from lightning_modules.visualize import colorize

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path: str | Path) -> Tensor:
    """RGB float tensor [3,H,W] in [0,1]: EXIF orientation applied, alpha dropped, grayscale replicated.

    16-bit and 32-bit integer grayscale ("I;16*", "I") is divided by 65535, float grayscale ("F") is taken as
    already in [0,1]; both are clipped to [0,1].
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        if image.mode != "F":
            gray = gray / 65535.0
        array = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
    else:
        if image.mode in ("LA", "La", "1"):
            image = image.convert("L")
        # convert("RGB") drops alpha without compositing and expands palettes, CMYK, YCbCr, L.
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)


def _plane(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = _numpy(x)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"expected {name} [H,W] or [1,H,W], got shape {array.shape}")
    return array


def _prepare(stem: str | Path) -> str:
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    return str(stem)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through `write(handle)` under a temporary name in the same folder, then rename it into place.

    An interrupt (Ctrl-C, a kill, a full disk) therefore never leaves a truncated file under `path`: either the
    old file (if any) or the complete new one is there. The temporary file is removed when `write` fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _save_npy(path: Path, array: np.ndarray) -> Path:
    # np.save on a file handle: no ".npy" is appended to the temporary name.
    return atomic_write(path, lambda handle: np.save(handle, array))


PNG_COMPRESS_LEVEL = 1  # zlib level of prediction PNGs: at 480x640 half the time of Pillow's 6, files ~2% larger


def _save_png(path: Path, image: Image.Image) -> Path:
    # The temporary name has no .png suffix for Pillow to infer the format from.
    return atomic_write(path, lambda handle: image.save(handle, format="PNG", compress_level=PNG_COMPRESS_LEVEL))


def depth_files(stem: str | Path) -> list[Path]:
    """The files `write_depth` writes for `stem`."""
    return [Path(f"{stem}_depth.npy"), Path(f"{stem}_depth_16bit.png"), Path(f"{stem}_depth_colored.png")]


def normals_files(stem: str | Path) -> list[Path]:
    """The files `write_normals` writes for `stem`."""
    return [Path(f"{stem}_normals.npy"), Path(f"{stem}_normals_colored.png")]


def uncertainty_file(stem: str | Path) -> Path:
    """The file `write_uncertainty` writes for `stem`."""
    return Path(f"{stem}_uncertainty.png")


def write_depth(stem: str | Path, depth: Tensor | np.ndarray) -> list[Path]:
    """Write `<stem>_depth.npy` (float32), `_depth_16bit.png` (uint16) and `_depth_colored.png` (Spectral).

    The npy and the 16-bit PNG hold the prediction as it is (docs/method.md §5.6, clipped to [0, 1] in the PNG);
    the colored PNG stretches this image's own min..max over the colormap (near = red, far = blue): depth is
    affine-invariant, so only its order within one image is meaningful, and a single prediction rarely spans
    [0, 1] (an ensemble is min-max normalised already). Each file is written atomically (`atomic_write`).
    """
    array = _plane(depth, "depth")
    paths = depth_files(_prepare(stem))
    _save_npy(paths[0], array.astype(np.float32))
    clipped = np.clip(array, 0.0, 1.0)
    # Pillow 13 infers mode I;16 from uint16 and raises when mode="I;16" is passed explicitly (docs/method.md §9.18).
    _save_png(paths[1], Image.fromarray(np.round(clipped * 65535).astype(np.uint16)))
    finite = clipped[np.isfinite(clipped)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high - low < 1e-6:  # a constant map: no contrast to stretch, colour it on the [0, 1] scale
        low, high = 0.0, 1.0
    colored = colorize(torch.from_numpy(clipped), low, high, "Spectral").permute(1, 2, 0).numpy()
    _save_png(paths[2], Image.fromarray(np.round(colored * 255).astype(np.uint8)))
    return paths


def write_normals(stem: str | Path, normals: Tensor | np.ndarray) -> list[Path]:
    """Write `<stem>_normals.npy` (float32 HxWx3) and `_normals_colored.png` ((n + 1) / 2 * 255), atomically."""
    array = _numpy(normals)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected normals [3,H,W], got shape {array.shape}")
    paths = normals_files(_prepare(stem))
    hwc = np.ascontiguousarray(array.transpose(1, 2, 0), dtype=np.float32)
    _save_npy(paths[0], hwc)
    _save_png(paths[1], Image.fromarray(np.round(np.clip((hwc + 1) / 2, 0, 1) * 255).astype(np.uint8)))
    return paths


def write_uncertainty(stem: str | Path, uncertainty: Tensor | np.ndarray) -> Path:
    """Write `<stem>_uncertainty.png`: grayscale, the 95th percentile saturating at 255 (atomically)."""
    array = _plane(uncertainty, "uncertainty")
    path = uncertainty_file(_prepare(stem))
    high = float(np.percentile(array, 95))
    scaled = np.clip(array / high, 0, 1) if high > 0 else np.zeros_like(array)
    return _save_png(path, Image.fromarray(np.round(scaled * 255).astype(np.uint8)))
