"""The shard format: what one training/evaluation sample looks like on disk.

Shards are WebDataset tar files named `<split>-NNNNNN.tar` (six digits, from 000000). A shard is written under
`<name>.tar.tmp` and renamed when complete, so a file with the final name is always whole. Each sample is a
group of tar members sharing a key (`<key>.rgb.png`, `<key>.depth.png`, ...):

| member | content |
|---|---|
| `__key__` | sample id, unique within the dataset, without `.` (WebDataset splits names at the first dot), e.g. `synthetic-train-000042`, `ai_001_001-cam_00-0012` |
| `rgb.png` | 8-bit RGB image, the network input |
| `depth.png` | 16-bit grayscale PNG; metres = value x `depth_scale`; 0 = no data |
| `mask.png` | 8-bit grayscale PNG; 255 = valid pixel, 0 = invalid (sky, window, missing geometry) |
| `normals.png` | optional 8-bit RGB PNG; n = value / 255 x 2 - 1, renormalised; camera frame x left, y up, z towards the viewer, facing the camera (docs/method.md §4.1); ignored where mask = 0 |
| `json` | metadata (UTF-8 JSON object), see below |

Metadata keys: `source` (`synthetic`, `hypersim`, `vkitti2`, ...), `domain` (`indoor` / `outdoor`), `depth_scale`
(metres per depth unit: 0.001 = millimetres, the default; 0.01 = centimetres), `min_depth` / `max_depth` (valid
range in metres; training masks depth outside it), `intrinsics` ([fx, fy, cx, cy] in pixels), `height`, `width`,
plus free-form provenance (`seed`, original file name, ...). All rasters of one sample have the same height and
width, multiples of 8 for training (convert with a resize or crop).

Keys written by the real-data converters (`datamodules.convert`; all optional, absent in older shards):
`split` (`train` / `val` / `test`), `has_depth` (false: a normals-only sample whose `mask.png` is the normals'
validity and whose `depth.png` is all zero; absent = true), `converter`, `inputs` (raw files, relative paths),
`crop` ([top, left, height, width] taken from the `original_size` [H, W] raster), `resized_from` [H, W]. Evaluation
shards add: `eval_protocol` (`marigold_depth`, docs/method.md §6.1, or `dsine_normals`, §6.2); `eval_min_depth` /
`eval_max_depth` (clip range of aligned predictions in metres, null = unbounded); `eval_mask` (the rule that built
`mask.png`, which is the complete evaluation mask: `range`, `range+eigen_crop`, `file`, `rgb_sum>0`, `norm>0.5`);
`eval_crop` ([top, bottom, left, right] pixel box already ANDed into `mask.png`, or null);
`eval_processing_resolution` (long edge to predict at, 0 = native); `eval_alignment` (`least_squares` in depth
space, or `none`) and `eval_alignment_max_res` (long edge of the copies the alignment is fitted on, null = full).
For evaluation shards `min_depth` / `max_depth` are the range that built `mask.png` (an unbounded one is written as
65536 x `depth_scale`), so applying them removes nothing more.

Depth is planar (along the optical axis), not distance to the camera centre. PNG is lossless, so depth keeps
`depth_scale` precision (1 mm by default, up to 65.535 m); a valid depth that does not fit 16 bits raises an
error (choose a larger `depth_scale`); NaN, infinite, non-positive or masked depth is stored as 0 with mask 0.
Decoding (`decode_sample`) gives rgb uint8 HxWx3, depth float32 HxW metres, mask bool HxW (also False where
depth is 0, unless `has_depth` is false), normals float32 HxWx3 unit vectors when present, and the metadata dict.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REQUIRED_MEMBERS = ("rgb.png", "depth.png", "mask.png", "json")
DEFAULT_DEPTH_SCALE = 0.001


class SampleFormatError(ValueError):
    """A sample that does not follow the shard format (missing member, wrong size, undecodable image)."""


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # No explicit mode: Pillow infers I;16 from uint16 (mode="I;16" raises in Pillow >= 13).
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_sample(
    key: str,
    rgb: np.ndarray,
    depth: np.ndarray,
    mask: np.ndarray,
    normals: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pack one sample into WebDataset members: rgb uint8 HxWx3, depth float metres HxW, mask bool HxW."""
    if "." in key or "/" in key or not key:
        raise SampleFormatError(f"sample key {key!r} must be non-empty without '.' or '/' (WebDataset grouping)")
    meta = dict(meta or {})
    scale = float(meta.setdefault("depth_scale", DEFAULT_DEPTH_SCALE))
    if depth.ndim != 2:
        raise SampleFormatError(f"{key}: depth must be HxW, got shape {depth.shape}")
    height, width = depth.shape
    if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
        raise SampleFormatError(f"{key}: rgb must be uint8 {height}x{width}x3, got {rgb.dtype} {rgb.shape}")
    if mask.shape != (height, width):
        raise SampleFormatError(f"{key}: mask shape {mask.shape} differs from depth shape {depth.shape}")
    has_depth = meta.get("has_depth", True)
    valid = mask.astype(bool)
    if has_depth:
        valid &= np.isfinite(depth) & (depth > 0)
    # a normals-only sample (has_depth false) keeps its mask (the normals' validity) and stores depth as all zero
    units = np.where(valid & has_depth, np.round(np.nan_to_num(depth, nan=0.0, posinf=0.0) / scale), 0)
    if units.max(initial=0) > np.iinfo(np.uint16).max:
        raise SampleFormatError(
            f"{key}: depth {depth[valid].max():.3f} m does not fit 16 bits at depth_scale {scale}; use a larger scale"
        )
    if has_depth:
        valid &= units > 0
    meta.update(height=height, width=width)
    members = {
        "__key__": key,
        "rgb.png": _png(rgb),
        "depth.png": _png(units.astype(np.uint16)),
        "mask.png": _png(np.where(valid, 255, 0).astype(np.uint8)),
        "json": json.dumps(meta).encode("utf-8"),
    }
    if normals is not None:
        if normals.shape != (height, width, 3):
            raise SampleFormatError(f"{key}: normals must be {height}x{width}x3, got {normals.shape}")
        quantised = np.round((np.clip(np.nan_to_num(normals), -1, 1) + 1) / 2 * 255).astype(np.uint8)
        members["normals.png"] = _png(quantised)
    return members


def _read_png(data: bytes, key: str, member: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image)
    except Exception as err:  # PIL raises many types for corrupt data
        raise SampleFormatError(f"{key}: cannot decode {member}: {err}") from err


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Unpack raw WebDataset members (bytes) into numpy arrays with exact dtypes and a metadata dict."""
    key = f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}"
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    if missing:
        raise SampleFormatError(f"{key}: missing members {missing}")
    try:
        meta = json.loads(raw["json"])
    except ValueError as err:
        raise SampleFormatError(f"{key}: unreadable json metadata: {err}") from err
    if not isinstance(meta, dict):
        raise SampleFormatError(f"{key}: json metadata must be an object, got {type(meta).__name__}")
    rgb = _read_png(raw["rgb.png"], key, "rgb.png")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SampleFormatError(f"{key}: rgb.png must be 8-bit RGB, got {rgb.dtype} {rgb.shape}")
    units = _read_png(raw["depth.png"], key, "depth.png")
    if units.ndim != 2 or units.dtype not in (np.uint16, np.int32):
        raise SampleFormatError(f"{key}: depth.png must be 16-bit grayscale, got {units.dtype} {units.shape}")
    depth = units.astype(np.float32) * np.float32(meta.get("depth_scale", DEFAULT_DEPTH_SCALE))
    mask = _read_png(raw["mask.png"], key, "mask.png") > 127
    if rgb.shape[:2] != depth.shape or mask.shape != depth.shape:
        raise SampleFormatError(f"{key}: rgb {rgb.shape[:2]}, depth {depth.shape}, mask {mask.shape} differ in size")
    if meta.get("has_depth", True):
        mask &= depth > 0
    sample = {"key": str(raw.get("__key__", "?")), "rgb": rgb, "depth": depth, "mask": mask, "meta": meta}
    if "normals.png" in raw:
        quantised = _read_png(raw["normals.png"], key, "normals.png").astype(np.float32)
        if quantised.shape != rgb.shape:
            raise SampleFormatError(f"{key}: normals.png must be 8-bit RGB {rgb.shape}, got {quantised.shape}")
        normals = quantised / 255 * 2 - 1
        normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
        sample["normals"] = normals.astype(np.float32)
    return sample


def first_metadata(shard: str | Path) -> dict[str, Any] | None:
    """The metadata of a shard's first sample (only its `json` member is read), None if the shard has none."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                handle = tar.extractfile(member)
                return json.loads(handle.read()) if handle is not None else None
    return None
