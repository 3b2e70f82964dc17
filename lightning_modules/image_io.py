"""Reading images of any common mode and writing predictions in the output conventions of docs/method.md §5.6."""

from __future__ import annotations

from pathlib import Path

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


def write_depth(stem: str | Path, depth: Tensor | np.ndarray) -> list[Path]:
    """Write `<stem>_depth.npy` (float32), `_depth_16bit.png` (uint16) and `_depth_colored.png` (Spectral)."""
    array = _plane(depth, "depth")
    base = _prepare(stem)
    paths = [Path(f"{base}_depth.npy"), Path(f"{base}_depth_16bit.png"), Path(f"{base}_depth_colored.png")]
    np.save(paths[0], array.astype(np.float32))
    clipped = np.clip(array, 0.0, 1.0)
    # Pillow 13 infers mode I;16 from uint16 and raises when mode="I;16" is passed explicitly (docs/method.md §9.18).
    Image.fromarray(np.round(clipped * 65535).astype(np.uint16)).save(paths[1])
    colored = colorize(torch.from_numpy(clipped), 0.0, 1.0, "Spectral").permute(1, 2, 0).numpy()
    Image.fromarray(np.round(colored * 255).astype(np.uint8)).save(paths[2])
    return paths


def write_normals(stem: str | Path, normals: Tensor | np.ndarray) -> list[Path]:
    """Write `<stem>_normals.npy` (float32 HxWx3) and `_normals_colored.png` ((n + 1) / 2 * 255)."""
    array = _numpy(normals)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected normals [3,H,W], got shape {array.shape}")
    base = _prepare(stem)
    paths = [Path(f"{base}_normals.npy"), Path(f"{base}_normals_colored.png")]
    hwc = np.ascontiguousarray(array.transpose(1, 2, 0), dtype=np.float32)
    np.save(paths[0], hwc)
    Image.fromarray(np.round(np.clip((hwc + 1) / 2, 0, 1) * 255).astype(np.uint8)).save(paths[1])
    return paths


def write_uncertainty(stem: str | Path, uncertainty: Tensor | np.ndarray) -> Path:
    """Write `<stem>_uncertainty.png`: grayscale, the 95th percentile saturating at 255."""
    array = _plane(uncertainty, "uncertainty")
    path = Path(f"{_prepare(stem)}_uncertainty.png")
    high = float(np.percentile(array, 95))
    scaled = np.clip(array / high, 0, 1) if high > 0 else np.zeros_like(array)
    Image.fromarray(np.round(scaled * 255).astype(np.uint8)).save(path)
    return path
