"""The depth evaluation sets of Marigold's evaluation archives -> evaluation shards, docs/method.md §6.1.

`--src` is the unpacked archive folder; paths in `--split-list` (Marigold's `data_split/<dataset>/*.txt`, one
sample per line, columns separated by spaces) are relative to it. Without a list every sample found is used.

| name | layout under `--src` (split-list columns) | GT | valid range (m) | eval mask |
|---|---|---|---|---|
| `nyuv2` | `test/<scene>/rgb_NNNN.png`, `depth_NNNN.png`, `filled_NNNN.png` (rgb depth filled) | raw depth PNG / 1000 (not the filled map) | (1e-3, 10) | range + Eigen crop rows 45:471, cols 41:601 |
| `kitti` | `<date>/<drive>/image_02/data/<frame>.png`, `<drive>/proj_depth/groundtruth/image_02/<frame>.png` (rgb depth focal; `None` depth = no GT, skipped) | PNG / 256 | (1e-5, 80) | KB crop 352x1216, then range + Eigen crop |
| `eth3d` | `rgb/<scene>/images/dslr_images/DSC_NNNN.JPG`, `depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/DSC_NNNN.JPG` (rgb depth) | raw float32 binary of the image's size, inf = no data | (1e-5, inf) | range |
| `scannet` | `<scene>/color/NNNNNN.jpg`, `<scene>/depth/NNNNNN.png` (rgb depth) | PNG / 1000 | (1e-3, 10) | range |
| `diode` | `{indoors,outdoor}/scene_*/scan_*/<name>.png`, `<name>_depth.npy`, `<name>_depth_mask.npy` (rgb depth mask) | npy metres | (0.6, 350) clips predictions only | the file mask |

Rasters keep their native size (after the KITTI benchmark crop); the evaluation crop is ANDed into `mask.png` and
recorded in `eval_crop`. Evaluation metadata (documented in datamodules.shard_format): `eval_protocol`
(`marigold_depth`), `eval_min_depth` / `eval_max_depth` (clip range for aligned predictions, null = unbounded),
`eval_mask`, `eval_crop`, `eval_processing_resolution` (0 = native), `eval_alignment`, `eval_alignment_max_res`.
"""

from __future__ import annotations

from argparse import ArgumentParser
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.convert.common import (
    SkipInput,
    box_mask,
    check_size,
    fit_depth_scale,
    kb_crop_box,
    make_key,
    read_png_units,
    read_rgb,
    require,
    resize_rgb,
)  # fmt: skip
from datamodules.convert.runner import Dataset, Input, Skip, provenance
from datamodules.shard_format import encode_sample

NYU_INTRINSICS = [518.8579, 519.4696, 325.5824, 253.7362]  # Kinect colour camera, 480x640
NYU_EIGEN_CROP = (45, 471, 41, 601)
ETH3D_OUTDOOR = {"courtyard", "electro", "facade", "meadow", "playground", "terrace"}


@dataclass(frozen=True)
class Protocol:
    """Per-dataset constants of the Marigold depth protocol (docs/method.md §6.1)."""

    source: str
    split: str
    min_depth: float
    max_depth: float | None  # None: no upper bound
    processing_resolution: int = 0
    alignment_max_res: int | None = None
    clip_only: tuple[float, float] | None = None  # DIODE: range clips predictions, the file gives the mask


PROTOCOLS = {
    "nyuv2": Protocol("nyuv2", "test", 1e-3, 10.0),
    "kitti": Protocol("kitti", "test", 1e-5, 80.0),
    "eth3d": Protocol("eth3d", "test", 1e-5, None, processing_resolution=756, alignment_max_res=1024),
    "scannet": Protocol("scannet", "test", 1e-3, 10.0),
    "diode": Protocol("diode", "val", 0.0, None, processing_resolution=640, clip_only=(0.6, 350.0)),
}


def _encode(
    item: Input, protocol: Protocol, rgb: np.ndarray, depth: np.ndarray, valid: np.ndarray, domain: str,
    scale: float, eval_mask: str, eval_crop: tuple[int, int, int, int] | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """Encode with the shared evaluation metadata; `valid` is the complete evaluation mask."""
    if not valid.any():
        raise SkipInput("no valid ground-truth pixel")
    clip_low, clip_high = protocol.clip_only or (protocol.min_depth, protocol.max_depth)
    meta = dict(
        source=protocol.source, domain=domain, split=protocol.split, depth_scale=scale,
        # the range that built mask.png; an unbounded one becomes "anything 16 bits hold" so readers mask nothing more
        min_depth=protocol.min_depth, max_depth=protocol.max_depth or 65536 * scale,
        eval_protocol="marigold_depth", eval_min_depth=clip_low, eval_max_depth=clip_high, eval_mask=eval_mask,
        eval_crop=list(eval_crop) if eval_crop else None, eval_processing_resolution=protocol.processing_resolution,
        eval_alignment="least_squares", eval_alignment_max_res=protocol.alignment_max_res,
        inputs=provenance(item), converter=protocol.source, **extra,
    )  # fmt: skip
    return encode_sample(item.key, rgb, depth, valid, None, meta)


def _in_range(depth: np.ndarray, protocol: Protocol) -> np.ndarray:
    valid = np.isfinite(depth) & (depth > protocol.min_depth)
    return valid & (depth < protocol.max_depth) if protocol.max_depth is not None else valid


def _list_columns(split_list: Path, columns: int) -> list[list[str]]:
    rows = []
    for number, line in enumerate(split_list.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) < columns:
                raise ValueError(f"{split_list}:{number}: expected {columns} columns, got {line!r}")
            rows.append(parts)
    return rows


def _inputs(src: Path, rows: list[tuple[str, dict[str, str], dict[str, Any]]]) -> list[Input]:
    root = {"root": str(src)}
    return [Input(key, {k: str(src / v) for k, v in paths.items()}, {**root, **info}) for key, paths, info in rows]


# NYUv2 ---------------------------------------------------------------------------------------------------------


def list_nyuv2(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
    """NYUv2 test images: split list (rgb depth filled) or `test/*/rgb_*.png`."""
    pairs = (
        [(r[0], r[1]) for r in _list_columns(split_list, 2)] if split_list
        else [(str(p.relative_to(src)), str(p.relative_to(src).with_name(p.name.replace("rgb_", "depth_"))))
              for p in src.glob("test/*/rgb_*.png")]
    )  # fmt: skip
    rows = [(make_key("nyuv2", Path(r).parent.name, Path(r).stem[len("rgb_") :]), {"rgb": r, "depth": d}, {})
            for r, d in pairs]  # fmt: skip
    return _inputs(src, rows), []


def convert_nyuv2(item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """NYUv2: raw depth in mm, Eigen crop in the mask."""
    protocol = PROTOCOLS["nyuv2"]
    rgb = read_rgb(require(Path(item.paths["rgb"]), "RGB image"))
    depth_path = require(Path(item.paths["depth"]), "depth PNG")
    depth = read_png_units(depth_path) / 1000.0
    check_size(depth_path, depth, rgb.shape[:2])
    check_size(depth_path, depth, (480, 640))  # the Eigen crop is defined on 480x640
    valid = _in_range(depth, protocol) & box_mask(depth.shape, NYU_EIGEN_CROP)
    return _encode(item, protocol, rgb, depth, valid, "indoor", 0.001, "range+eigen_crop", NYU_EIGEN_CROP,
                   intrinsics=NYU_INTRINSICS)  # fmt: skip


# KITTI ---------------------------------------------------------------------------------------------------------


def _kitti_key(rgb: Path) -> str:
    """kitti-<drive>-<camera>-<frame> from `<date>/<drive>/image_0X/data/<frame>.png`."""
    parts = rgb.parts
    if len(parts) < 5:
        raise ValueError(f"KITTI RGB path {rgb} is not <date>/<drive>/image_0X/data/<frame>.png")
    return make_key("kitti", parts[-4], parts[-3], rgb.stem)


def list_kitti(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
    """KITTI Eigen test: split list (rgb depth focal; `None` depth skipped) or every ground-truth PNG."""
    rows, skipped = [], []
    if split_list is not None:
        for parts in _list_columns(split_list, 2):
            key = _kitti_key(Path(parts[0]))
            if parts[1] == "None":
                skipped.append(Skip(key, "no ground truth (None in the split list)", {"rgb": str(src / parts[0])}))
                continue
            info = {"focal": float(parts[2])} if len(parts) > 2 else {}
            rows.append((key, {"rgb": parts[0], "depth": parts[1]}, info))
    else:
        for gt in src.glob("*/proj_depth/groundtruth/image_02/*.png"):
            drive = gt.parents[3].name
            rgb = Path(drive[:10], drive, "image_02", "data", gt.name)
            rows.append((_kitti_key(rgb), {"rgb": str(rgb), "depth": str(gt.relative_to(src))}, {}))
    return _inputs(src, rows), skipped


def eigen_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """Eigen evaluation crop (rows top:bottom, cols left:right) of a KITTI image of this size."""
    return int(0.3324324 * height), int(0.91351351 * height), int(0.0359477 * width), int(0.96405229 * width)


def convert_kitti(item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """KITTI: depth / 256 m, benchmark crop on both rasters, Eigen crop in the mask."""
    protocol = PROTOCOLS["kitti"]
    rgb = read_rgb(require(Path(item.paths["rgb"]), "RGB image"))
    depth_path = require(Path(item.paths["depth"]), "ground-truth PNG")
    units = read_png_units(depth_path)
    check_size(depth_path, units, rgb.shape[:2])
    top, left = kb_crop_box(*units.shape)
    window = np.s_[top : top + 352, left : left + 1216]
    depth = units[window] / 256.0
    box = eigen_crop_box(*depth.shape)
    valid = _in_range(depth, protocol) & box_mask(depth.shape, box)
    extra = {"focal": item.info["focal"]} if "focal" in item.info else {}
    return _encode(item, protocol, rgb[window], depth, valid, "outdoor", 1 / 256, "range+eigen_crop", box,
                   crop=[top, left, 352, 1216], original_size=list(units.shape), **extra)  # fmt: skip


# ETH3D ---------------------------------------------------------------------------------------------------------


def list_eth3d(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
    """ETH3D: split list (rgb depth) or every `rgb/*/images/dslr_images/*.JPG` with its depth file."""
    if split_list is not None:
        pairs = [(r[0], r[1]) for r in _list_columns(split_list, 2)]
    else:
        pairs = []
        for rgb in src.glob("rgb/*/images/dslr_images/*.JPG"):
            scene = rgb.parents[2].name
            depth = Path("depth", f"{scene}_dslr_depth", scene, "ground_truth_depth", "dslr_images", rgb.name)
            pairs.append((str(rgb.relative_to(src)), str(depth)))
    rows = [(make_key("eth3d", Path(r).parts[1], Path(r).stem), {"rgb": r, "depth": d}, {"scene": Path(r).parts[1]})
            for r, d in pairs]  # fmt: skip
    return _inputs(src, rows), []


def convert_eth3d(item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """ETH3D: float32 raw depth (inf = no data), full resolution, per-sample depth scale."""
    protocol = PROTOCOLS["eth3d"]
    rgb = read_rgb(require(Path(item.paths["rgb"]), "RGB image"))
    raw = np.fromfile(require(Path(item.paths["depth"]), "depth file"), dtype="<f4")
    height, width = rgb.shape[:2]
    if raw.size != height * width:
        raise SkipInput(f"{item.paths['depth']}: {raw.size} floats, expected {height}x{width} = {height * width}")
    depth = np.where(np.isfinite(raw), raw, 0.0).astype(np.float64).reshape(height, width)
    valid = _in_range(depth, protocol)
    scale = fit_depth_scale(depth, valid)
    domain = "outdoor" if item.info["scene"] in ETH3D_OUTDOOR else "indoor"
    return _encode(item, protocol, rgb, depth, valid, domain, scale, "range", scene=item.info["scene"])


# ScanNet -------------------------------------------------------------------------------------------------------


def list_scannet(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
    """ScanNet: split list (rgb depth) or every `*/color/*.jpg` with `*/depth/<same>.png`."""
    pairs = (
        [(r[0], r[1]) for r in _list_columns(split_list, 2)] if split_list
        else [(str(p.relative_to(src)), str(Path(p.parents[1].name, "depth", p.stem + ".png")))
              for p in src.glob("*/color/*.jpg")]
    )  # fmt: skip
    rows = [(make_key("scannet", Path(r).parts[0], Path(r).stem), {"rgb": r, "depth": d}, {}) for r, d in pairs]
    return _inputs(src, rows), []


def convert_scannet(item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """ScanNet: depth PNG in mm; an RGB of another size is resized (bilinear) to the depth's."""
    protocol = PROTOCOLS["scannet"]
    rgb = read_rgb(require(Path(item.paths["rgb"]), "RGB image"))
    depth = read_png_units(require(Path(item.paths["depth"]), "depth PNG")) / 1000.0
    extra = {"rgb_resized_from": list(rgb.shape[:2])} if rgb.shape[:2] != depth.shape else {}
    rgb = resize_rgb(rgb, *depth.shape)
    return _encode(item, protocol, rgb, depth, _in_range(depth, protocol), "indoor", 0.001, "range", **extra)


# DIODE ---------------------------------------------------------------------------------------------------------


def list_diode(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
    """DIODE val: split list (rgb depth mask) or every `*/scene_*/scan_*/*.png` with its two npy files."""
    if split_list is not None:
        triples = [(r[0], r[1], r[2]) for r in _list_columns(split_list, 3)]
    else:
        triples = [
            (str(p.relative_to(src)), str(p.relative_to(src).with_name(p.stem + "_depth.npy")),
             str(p.relative_to(src).with_name(p.stem + "_depth_mask.npy")))
            for p in src.glob("*/scene_*/scan_*/*.png")
        ]  # fmt: skip
    rows = [(make_key("diode", Path(r).stem), {"rgb": r, "depth": d, "mask": m}, {"domain": Path(r).parts[0]})
            for r, d, m in triples]  # fmt: skip
    return _inputs(src, rows), []


def convert_diode(item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """DIODE: npy depth and the file's validity mask; the (0.6, 350) range only clips predictions."""
    protocol = PROTOCOLS["diode"]
    rgb = read_rgb(require(Path(item.paths["rgb"]), "RGB image"))
    depth = np.load(require(Path(item.paths["depth"]), "depth npy")).astype(np.float64).squeeze()
    file_mask = np.load(require(Path(item.paths["mask"]), "depth mask npy")).squeeze().astype(bool)
    check_size(Path(item.paths["depth"]), depth, rgb.shape[:2])
    check_size(Path(item.paths["mask"]), file_mask, rgb.shape[:2])
    valid = file_mask & np.isfinite(depth) & (depth > 0)
    domain = {"indoors": "indoor", "outdoor": "outdoor"}.get(item.info["domain"], item.info["domain"])
    return _encode(item, protocol, rgb, depth, valid, domain, fit_depth_scale(depth, valid), "file")


def _no_arguments(parser: ArgumentParser) -> None:
    """No dataset-specific options."""


DATASETS = [
    Dataset("nyuv2", "test", 16, list_nyuv2, convert_nyuv2,
            "NYUv2 Eigen test (Marigold archive) -> 654 depth evaluation samples, 480x640", _no_arguments,
            "test/<scene>/rgb_NNNN.png with depth_NNNN.png (the unpacked Marigold nyuv2 archive)"),
    Dataset("kitti", "test", 16, list_kitti, convert_kitti,
            "KITTI Eigen test (Marigold archive) -> 652 depth evaluation samples, 352x1216", _no_arguments,
            "<date>/<drive>/image_02/data/<frame>.png and <drive>/proj_depth/groundtruth/image_02/<frame>.png"),
    Dataset("eth3d", "test", 4, list_eth3d, convert_eth3d,
            "ETH3D (Marigold archive) -> 454 depth evaluation samples, native 4032x6048", _no_arguments,
            "rgb/<scene>/images/dslr_images/DSC_NNNN.JPG and depth/<scene>_dslr_depth/<scene>/ground_truth_depth/dslr_images/DSC_NNNN.JPG"),
    Dataset("scannet", "test", 16, list_scannet, convert_scannet,
            "ScanNet (Marigold archive, 800 sampled val frames) -> depth evaluation samples, 480x640", _no_arguments,
            "<scene>/color/NNNNNN.jpg and <scene>/depth/NNNNNN.png"),
    Dataset("diode", "val", 16, list_diode, convert_diode,
            "DIODE val (Marigold archive) -> 771 depth evaluation samples, 768x1024", _no_arguments,
            "{indoors,outdoor}/scene_*/scan_*/<name>.png with <name>_depth.npy and <name>_depth_mask.npy"),
]  # fmt: skip
