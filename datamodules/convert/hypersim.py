"""Hypersim (Apple ml-hypersim, raw release layout) -> training shards, docs/method.md §4.1.

Expected layout under `--src` (the downloaded scenes, unpacked as released):

    <scene>/images/scene_<cam>_final_hdf5/frame.NNNN.color.hdf5               linear HDR colour, HxWx3
    <scene>/images/scene_<cam>_geometry_hdf5/frame.NNNN.depth_meters.hdf5     distance to the camera centre (m)
    <scene>/images/scene_<cam>_geometry_hdf5/frame.NNNN.render_entity_id.hdf5 -1 = no geometry (invalid)
    <scene>/images/scene_<cam>_geometry_hdf5/frame.NNNN.normal_cam.hdf5       optional camera-space normals
    <scene>/images/scene_<cam>_geometry_preview/frame.NNNN.normal_cam.png     optional 8-bit normals preview

e.g. `ai_001_001/images/scene_cam_00_final_hdf5/frame.0000.color.hdf5`; every HDF5 file holds one dataset
(named `dataset`). Frames: every colour file found, or `--split-list`: the official
`metadata_images_split_scene_v1.csv` (rows with `included_in_public_release` True and `split_partition_name`
= `--partition`) or a Marigold list (`ai_003_010/rgb_cam_00_fr0047.png ...`, first column per line).

Per frame: tone mapping (valid = entity id != -1; p90 of Y = 0.3R + 0.59G + 0.11B over valid pixels; scale =
0.8^2.2 / p90, 0 if p90 < 1e-4, 1 without valid pixels; rgb = clip(max(scale rgb, 0)^(1/2.2), 0, 1) x 255
truncated); distance -> planar depth with f = 886.81 px per 1024 px of width (60 degree horizontal field of
view) and the principal point at the centre (x = u - W/2 + 0.5, depth = dist f / sqrt(x^2 + y^2 + f^2));
normals (hdf5 preferred, else the preview PNG): y and z negated, flipped where they face away from the camera
(integer pixel rays through K), then negated, giving x left, y up, z towards the viewer; resize to `--size`
(default 480x640): RGB bilinear antialiased, depth centre-aligned nearest, normals bilinear renormalised, and
the mask (1e-5 < depth < 65 m) computed after resizing. Depth is stored in millimetres (rounded).
"""

from __future__ import annotations

import csv
import re
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.convert.common import (
    SkipInput,
    make_key,
    normalise,
    png_normals,
    require,
    resize_nearest,
    resize_normals,
    resize_rgb,
)  # fmt: skip
from datamodules.convert.runner import Dataset, Input, Skip, provenance
from datamodules.shard_format import encode_sample

FOCAL_PER_1024 = 886.81
MIN_DEPTH, MAX_DEPTH = 1e-5, 65.0
MARIGOLD_LINE = re.compile(r"(ai_\d+_\d+)/\w*?(cam_\d+)_fr(\d+)")


def read_hdf5(path: Path) -> np.ndarray:
    """The array stored in a Hypersim HDF5 file (its `dataset`, else its only dataset)."""
    import h5py

    with h5py.File(require(path, "hdf5 file"), "r") as f:
        name = "dataset" if "dataset" in f else next(iter(f.keys()), None)
        if name is None:
            raise SkipInput(f"{path}: empty HDF5 file")
        return np.asarray(f[name][()])


def tone_map(rgb: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
    """Hypersim's tone mapping of linear HDR colour to uint8 (docs/method.md §4.1); returns (image, scale)."""
    rgb = np.nan_to_num(rgb.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if valid.any():
        brightness = 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]
        p90 = float(np.percentile(brightness[valid], 90))
        scale = 0.0 if p90 < 1e-4 else 0.8**2.2 / p90
    else:
        scale = 1.0
    mapped = np.clip(np.power(np.maximum(scale * rgb, 0), 1 / 2.2), 0, 1)
    return (mapped * 255).astype(np.uint8), scale


def planar_depth(distance: np.ndarray, focal: float) -> np.ndarray:
    """Distance to the camera centre -> depth along the optical axis, principal point at the image centre."""
    height, width = distance.shape
    x = np.arange(width) - width / 2 + 0.5
    y = np.arange(height) - height / 2 + 0.5
    return distance * focal / np.sqrt(x[None, :] ** 2 + y[:, None] ** 2 + focal**2)


def orient_normals(normals: np.ndarray, focal: float) -> np.ndarray:
    """Hypersim camera normals (x right, y up, z back) -> x left, y up, z towards the viewer, camera-facing."""
    height, width = normals.shape[:2]
    opencv = normals * np.array([1.0, -1.0, -1.0])  # x right, y down, z forward
    rays = np.stack(np.broadcast_arrays(
        (np.arange(width)[None, :] - width / 2) / focal, (np.arange(height)[:, None] - height / 2) / focal, 1.0,
    ), axis=-1)  # fmt: skip
    away = (opencv * rays).sum(-1) > 0
    opencv[away] *= -1
    return -opencv


def _frame_paths(src: Path, scene: str, cam: str, frame: int) -> dict[str, str]:
    images = src / scene / "images"
    geometry = images / f"scene_{cam}_geometry_hdf5"
    name = f"frame.{frame:04d}"
    return dict(
        color=str(images / f"scene_{cam}_final_hdf5" / f"{name}.color.hdf5"),
        depth=str(geometry / f"{name}.depth_meters.hdf5"),
        entity=str(geometry / f"{name}.render_entity_id.hdf5"),
        normals_hdf5=str(geometry / f"{name}.normal_cam.hdf5"),
        normals_png=str(images / f"scene_{cam}_geometry_preview" / f"{name}.normal_cam.png"),
    )


def _frames_from_list(path: Path, partition: str) -> list[tuple[str, str, int]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            needed = {"scene_name", "camera_name", "frame_id", "included_in_public_release", "split_partition_name"}
            if not needed <= set(reader.fieldnames or []):
                raise ValueError(f"{path}: split CSV needs columns {sorted(needed)}, has {reader.fieldnames}")
            return [
                (row["scene_name"], row["camera_name"], int(row["frame_id"]))
                for row in reader
                if row["included_in_public_release"].strip().lower() == "true"
                and row["split_partition_name"].strip() == partition
            ]
    frames = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        match = MARIGOLD_LINE.search(line.split()[0])
        if match is None:
            raise ValueError(f"{path}:{number}: not a Marigold Hypersim line (ai_XXX_XXX/rgb_cam_XX_frNNNN.png)")
        frames.append((match[1], match[2], int(match[3])))
    return frames


def list_inputs(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
    """Frames of the split list, or every colour HDF5 file under `src`."""
    if split_list is not None:
        frames = _frames_from_list(split_list, options.get("partition", "train"))
    else:
        frames = []
        for color in src.glob("*/images/scene_cam_*_final_hdf5/frame.*.color.hdf5"):
            cam = color.parent.name[len("scene_") : -len("_final_hdf5")]
            frames.append((color.parents[2].name, cam, int(color.name.split(".")[1])))
    info = {"root": str(src)}
    inputs = [Input(make_key(s, c, f"{f:04d}"), _frame_paths(src, s, c, f), info) for s, c, f in frames]
    return inputs, []


def _normals(item: Input, require_normals: bool) -> tuple[np.ndarray | None, str | None]:
    if Path(item.paths["normals_hdf5"]).is_file():
        return read_hdf5(Path(item.paths["normals_hdf5"])).astype(np.float64), "normal_cam.hdf5"
    if Path(item.paths["normals_png"]).is_file():
        return png_normals(Path(item.paths["normals_png"])).astype(np.float64), "normal_cam.png"
    if require_normals:
        raise SkipInput(f"missing normals: {item.paths['normals_hdf5']} (or the preview PNG)")
    return None, None


def convert(item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """One Hypersim frame -> encoded shard members."""
    rgb_linear = read_hdf5(Path(item.paths["color"]))
    distance = read_hdf5(Path(item.paths["depth"])).astype(np.float64)
    entity = read_hdf5(Path(item.paths["entity"]))
    height, width = distance.shape[:2]
    if rgb_linear.shape != (height, width, 3) or entity.shape[:2] != (height, width):
        raise SkipInput(f"colour {rgb_linear.shape}, distance {distance.shape}, entity {entity.shape} disagree")
    entity = entity.reshape(height, width)
    valid = (entity != -1) & np.isfinite(distance) & (distance > 0)
    rgb, scale = tone_map(rgb_linear, valid)
    focal = FOCAL_PER_1024 * width / 1024
    depth = np.where(valid, planar_depth(np.nan_to_num(distance), focal), 0.0)
    normals, normals_source = _normals(item, bool(options.get("require_normals")))
    if normals is not None:
        if normals.shape != (height, width, 3):
            raise SkipInput(f"normals shape {normals.shape} differs from {(height, width, 3)}")
        normals = np.where(valid[..., None], orient_normals(normalise(normals), focal), 0.0)

    out_h, out_w = (height, width) if options.get("native") else options.get("size") or (480, 640)
    rgb = resize_rgb(rgb, out_h, out_w)
    depth = resize_nearest(depth, out_h, out_w)
    if normals is not None:
        normals = resize_normals(normals, out_h, out_w)
    mask = (depth > MIN_DEPTH) & (depth < MAX_DEPTH)
    meta = dict(
        source="hypersim", domain="indoor", split=options.get("partition", "train"), depth_scale=0.001,
        min_depth=MIN_DEPTH, max_depth=MAX_DEPTH,
        intrinsics=[focal * out_w / width, focal * out_h / height, out_w / 2, out_h / 2],
        resized_from=[height, width], tone_mapping_scale=scale, normals_source=normals_source,
        inputs=provenance(item), converter="hypersim",
    )  # fmt: skip
    return encode_sample(item.key, rgb, depth, mask, normals, meta)


def add_arguments(parser: ArgumentParser) -> None:
    """Hypersim options: partition, output size, normals requirement."""
    parser.add_argument("--partition", default="train", help="split_partition_name kept from a CSV split list; "
                        "also the shard prefix and the `split` metadata (default: train)")  # fmt: skip
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="output size (default 480 640, as E2E FT trains)")  # fmt: skip
    parser.add_argument("--native", action="store_true", help="keep the native 768x1024 (no resize)")
    parser.add_argument("--require-normals", action="store_true",
                        help="skip frames without normals (the E2E-FT selection) instead of writing them")  # fmt: skip


DATASET = Dataset(
    name="hypersim", prefix="train", shard_size=256, list_inputs=list_inputs, convert=convert,
    summary="Hypersim raw HDF5 release -> 480x640 training shards (tone mapped, planar depth in mm, normals)",
    add_arguments=add_arguments,
    layout="<scene>/images/scene_<cam>_final_hdf5/frame.NNNN.color.hdf5 and "
    "<scene>/images/scene_<cam>_geometry_hdf5/frame.NNNN.{depth_meters,render_entity_id}.hdf5 "
    "(e.g. ai_001_001/images/scene_cam_00_final_hdf5/frame.0000.color.hdf5)",
)  # fmt: skip
