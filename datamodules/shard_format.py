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

A sample that breaks these rules is refused with a `SampleFormatError` whose `reason` names the rule for the skip
counts (`datamodules.targets.SKIP_REASONS`): `missing_member`; `bad_image` (undecodable PNG, or the wrong kind:
an 8-bit `depth.png`, an RGB `mask.png`); `size_mismatch` (rasters of different sizes); `bad_metadata` (`json`
unreadable or not an object; `depth_scale` not a positive finite number; `min_depth` / `max_depth` not numbers, NaN,
or min >= max, null meaning absent; `has_depth` not a boolean). A shard folder may hold a `manifest.json` giving
each shard's sample count (`expected_samples`: the manifests of the converters, the synthetic generator and
`shard_writer.ShardWriter`), which lets the streams count the samples a truncated shard lost and plan a validation
pass before reading it; `sample_count` falls back to counting sample keys in a local `.tar`'s headers.

Depth is planar (along the optical axis), not distance to the camera centre. PNG is lossless, so depth keeps
`depth_scale` precision (1 mm by default, up to 65.535 m); a valid depth that does not fit 16 bits raises an
error (choose a larger `depth_scale`); NaN, infinite, non-positive or masked depth is stored as 0 with mask 0.
Decoding (`decode_sample`) gives rgb uint8 HxWx3, depth float32 HxW metres, mask bool HxW (also False where
depth is 0, unless `has_depth` is false), normals float32 HxWx3 unit vectors when present, and the metadata dict.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import re
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

REQUIRED_MEMBERS = ("rgb.png", "depth.png", "mask.png", "json")
DEFAULT_DEPTH_SCALE = 0.001


MANIFEST = "manifest.json"


class SampleFormatError(ValueError):
    """A sample that does not follow the shard format; `reason` is its skip reason (datamodules.targets.SKIP_REASONS)."""

    def __init__(self, message: str, reason: str = "bad_sample") -> None:
        super().__init__(message)
        self.reason = reason


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_depth_scale(value: Any, key: str) -> float:
    """`depth_scale` as a float, or a `bad_metadata` error naming the key (NaN, infinite, <= 0, not a number)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise SampleFormatError(
            f"{key}: depth_scale {value!r} is not a positive finite number (metres per depth unit, e.g. 0.001)",
            "bad_metadata",
        )
    return float(value)


def check_metadata(meta: dict[str, Any], key: str) -> None:
    """Refuse metadata the decoder or the targets cannot use, with a `bad_metadata` reason and the offending value."""
    check_depth_scale(meta.get("depth_scale", DEFAULT_DEPTH_SCALE), key)
    for name in ("min_depth", "max_depth"):
        value = meta.get(name)
        if value is not None and (not _is_number(value) or math.isnan(value)):
            raise SampleFormatError(f"{key}: {name} {value!r} is not a number of metres", "bad_metadata")
    low, high = meta.get("min_depth"), meta.get("max_depth")
    if low is not None and high is not None and not low < high:
        raise SampleFormatError(f"{key}: min_depth {low!r} is not below max_depth {high!r}", "bad_metadata")
    if not isinstance(meta.get("has_depth", True), bool):
        raise SampleFormatError(f"{key}: has_depth {meta['has_depth']!r} is not true or false", "bad_metadata")


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
    scale = check_depth_scale(meta.setdefault("depth_scale", DEFAULT_DEPTH_SCALE), key)
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
    except UnidentifiedImageError as err:
        raise SampleFormatError(f"{key}: cannot decode {member}: not an image file", "bad_image") from err
    except Exception as err:  # PIL raises many types for corrupt data
        raise SampleFormatError(f"{key}: cannot decode {member}: {type(err).__name__}: {err}", "bad_image") from err


def decode_sample(raw: dict[str, Any], normals: bool = True) -> dict[str, Any]:
    """Unpack raw WebDataset members (bytes) into numpy arrays with exact dtypes and a metadata dict.

    `normals=False` leaves `normals.png` undecoded and unchecked (the sample then has no `normals`)."""
    key = f"{raw.get('__key__', '?')} in {raw.get('__url__', '?')}"
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    if missing:
        raise SampleFormatError(f"{key}: missing members {missing}", "missing_member")
    try:
        meta = json.loads(raw["json"])
    except ValueError as err:
        raise SampleFormatError(f"{key}: unreadable json metadata: {err}", "bad_metadata") from err
    if not isinstance(meta, dict):
        raise SampleFormatError(f"{key}: json metadata must be an object, got {type(meta).__name__}", "bad_metadata")
    check_metadata(meta, key)
    rgb = _read_png(raw["rgb.png"], key, "rgb.png")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SampleFormatError(f"{key}: rgb.png must be 8-bit RGB, got {rgb.dtype} {rgb.shape}", "bad_image")
    units = _read_png(raw["depth.png"], key, "depth.png")
    if units.ndim != 2 or units.dtype not in (np.uint16, np.int32):
        raise SampleFormatError(
            f"{key}: depth.png must be a 16-bit grayscale PNG (metres = value x depth_scale), got {units.dtype} "
            f"{units.shape}" + (" (an 8-bit PNG)" if units.dtype == np.uint8 else ""),
            "bad_image",
        )
    depth = units.astype(np.float32) * np.float32(meta.get("depth_scale", DEFAULT_DEPTH_SCALE))
    stored_mask = _read_png(raw["mask.png"], key, "mask.png")
    if stored_mask.ndim != 2:
        raise SampleFormatError(f"{key}: mask.png must be 8-bit grayscale, got shape {stored_mask.shape}", "bad_image")
    mask = stored_mask > 127
    if rgb.shape[:2] != depth.shape or mask.shape != depth.shape:
        raise SampleFormatError(
            f"{key}: rgb {rgb.shape[:2]}, depth {depth.shape}, mask {mask.shape} differ in size", "size_mismatch"
        )
    if meta.get("has_depth", True):
        mask &= depth > 0
    sample = {"key": str(raw.get("__key__", "?")), "rgb": rgb, "depth": depth, "mask": mask, "meta": meta}
    if normals and "normals.png" in raw:
        quantised = _read_png(raw["normals.png"], key, "normals.png").astype(np.float32)
        if quantised.shape != rgb.shape:
            reason = "size_mismatch" if quantised.shape[2:] == (3,) else "bad_image"
            raise SampleFormatError(f"{key}: normals.png must be 8-bit RGB {rgb.shape}, got {quantised.shape}", reason)
        normals = quantised * np.float32(2 / 255) - np.float32(1)
        length = np.sqrt(np.einsum("...i,...i->...", normals, normals))  # 3x faster than np.linalg.norm here
        normals /= np.maximum(length, np.float32(1e-6))[..., None]
        sample["normals"] = normals
    return sample


def first_metadata(shard: str | Path) -> dict[str, Any] | None:
    """The metadata of a shard's first sample (only its `json` member is read), None if the shard has none."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                handle = tar.extractfile(member)
                return json.loads(handle.read()) if handle is not None else None
    return None


def manifest_counts(manifest: Any) -> dict[str, int]:
    """Per-shard sample counts a parsed manifest.json gives (shard file name -> count; shards it lacks are absent)."""
    if not isinstance(manifest, dict):
        return {}
    names = manifest.get("shards") or []
    counts = manifest.get("samples_per_shard")
    params = manifest.get("params") if isinstance(manifest.get("params"), dict) else {}
    if isinstance(counts, list) and len(counts) == len(names):  # converters (convert.runner), ShardWriter
        return {name: count for name, count in zip(names, counts) if _is_count(count)}
    per, total = params.get("samples_per_shard"), params.get("num_samples")
    if _is_count(per) and _is_count(total) and per > 0:  # the synthetic generator
        return {name: max(0, min(per, total - k * per)) for k, name in enumerate(names)}
    return {}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@lru_cache(maxsize=256)
def _manifest_counts(folder: str, stamp: tuple[int, int, int]) -> dict[str, int]:
    """Per-shard sample counts from a folder's manifest.json (`stamp`, its mtime, inode and size, keys the cache)."""
    try:
        return manifest_counts(json.loads((Path(folder) / MANIFEST).read_text()))
    except (OSError, ValueError):
        return {}


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    """A file version: mtime, inode (a file replaced by os.replace is a new one) and size."""
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


def expected_samples(shard: str | Path) -> int | None:
    """How many samples the shard was written with, from `manifest.json` next to it; None if no manifest says."""
    path = Path(shard)
    manifest = path.parent / MANIFEST
    try:
        stamp = _stamp(manifest.stat())
    except OSError:
        return None
    return _manifest_counts(str(path.parent), stamp).get(path.name)


_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@lru_cache(maxsize=4096)
def _header_count(path: str, stamp: tuple[int, int, int]) -> int:
    count, key = 0, None
    try:
        # random access on an unbuffered file: reads the 512-byte headers and seeks over the data
        with open(path, "rb", buffering=0) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                name = member.name
                if not member.isreg() or _META_MEMBER.match(name):
                    continue
                match = _KEY_AND_SUFFIX.match(name)
                if match is not None and match.group(1) != key:  # webdataset's group_by_keys: a new key
                    count, key = count + 1, match.group(1)
    except (OSError, EOFError, tarfile.TarError):
        pass  # a damaged tar: the samples whose headers come before the damage
    return count


def header_sample_count(shard: str | Path) -> int | None:
    """Samples in a local uncompressed `.tar` shard, counted as WebDataset groups its members, from the tar headers
    only (no payload is read; cached per file version). A missing file counts 0, a damaged tar the samples before
    the damage (a partial last one included); None for anything but a local `.tar` path."""
    path = str(shard)
    if not path.endswith(".tar") or "://" in path or path.startswith("pipe:"):
        return None
    try:
        stamp = _stamp(os.stat(path))
    except OSError:
        return 0
    return _header_count(path, stamp)


def sample_count(shard: str | Path) -> int | None:
    """The shard's sample count: its `manifest.json` entry, else counted from its tar headers
    (`header_sample_count`); None when neither can tell (not a local `.tar`, no manifest entry)."""
    expected = expected_samples(shard)
    return expected if expected is not None else header_sample_count(shard)


@lru_cache(maxsize=4096)
def _tar_damage(path: str, size: int, stamp: int) -> str | None:
    try:
        # random access on an unbuffered file: reads the headers, seeks over the data
        with open(path, "rb", buffering=0) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for _ in tar:
                pass
            end = tar.offset  # where reading stopped: the end-of-archive marker of a whole tar
        with open(path, "rb") as handle:
            handle.seek(end)
            after = handle.read(1024)
            handle.seek(max(size - 1024, 0))
            tail = handle.read(1024)
    except tarfile.TarError as error:
        return f"{type(error).__name__}: {error}"
    if end >= size or len(after) < 1024 or tail != bytes(1024):
        return f"the tar ends at byte {size} without its end-of-archive marker: cut short"
    if after != bytes(1024):
        return f"unreadable tar header at byte {end} of {size}"
    return None


def tar_damage(shard: str | Path) -> str | None:
    """Why a local `.tar` shard is not whole (None: whole, or not a local `.tar` file), from its headers only.

    Catches what reading a tar as a stream takes for a normal end: a file cut at a member boundary (no
    end-of-archive marker) and an unreadable header in the middle (reading stops there). Cached per file version.
    """
    path = str(shard)
    if not path.endswith(".tar"):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _tar_damage(path, stat.st_size, stat.st_mtime_ns)
