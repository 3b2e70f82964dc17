"""Virtual KITTI 2 -> training shards (KITTI benchmark crop, depth in cm), docs/method.md §4.2.

Expected layout under `--src` (the release archives unpacked side by side):

    vkitti_2.0.3_rgb/SceneXX/<variation>/frames/rgb/Camera_K/rgb_NNNNN.jpg         1242x375 RGB
    vkitti_2.0.3_depth/SceneXX/<variation>/frames/depth/Camera_K/depth_NNNNN.png   uint16 centimetres
    vkitti_DAG_normals/SceneXX/<variation>/frames/normal/Camera_K/normal_NNNNN.png optional normals (E2E-FT's
        offline D2NT normals, already x left, y up, z towards the viewer; read as 8-bit RGB like the reference)

Frames: `--subset e2e_ft` (default: Scenes 01, 02, 06, 18, 20 x morning, fog, rain, sunset, overcast x both
cameras = 21 260), `marigold` (Scenes 02, 06, 18, 20 x clone, 15-deg-left, 15-deg-right, morning, overcast,
sunset = 20 148), `marigold_val` (Scene01, same variations = 5 364) or `all`; or `--split-list` in Marigold's
format (first column `.../SceneXX/<variation>/frames/rgb/Camera_K/rgb_NNNNN.jpg`).
Per frame: depth = png / 100 m (sky = 65535 -> 655.35 m), valid where 1e-5 < depth < 80 m; the KITTI benchmark
crop 352x1216 (top = H - 352, left = (W - 1216) // 2) on every raster; no resize. Stored in centimetres
(`depth_scale` 0.01, lossless); intrinsics fx = fy = 725.0087, cx = 620.5, cy = 187 shifted by the crop.
"""

from __future__ import annotations

import re
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.convert.common import (
    SkipInput,
    check_size,
    kb_crop_box,
    make_key,
    normalise,
    png_normals,
    read_png_units,
    read_rgb,
    require,
)  # fmt: skip
from datamodules.convert.runner import Dataset, Input, Skip, provenance
from datamodules.shard_format import encode_sample

MIN_DEPTH, MAX_DEPTH = 1e-5, 80.0
FOCAL, CX, CY = 725.0087, 620.5, 187.0
MARIGOLD_VARIATIONS = ("clone", "15-deg-left", "15-deg-right", "morning", "overcast", "sunset")
SUBSETS = {
    "e2e_ft": (
        ("Scene01", "Scene02", "Scene06", "Scene18", "Scene20"), ("morning", "fog", "rain", "sunset", "overcast")
    ),
    "marigold": (("Scene02", "Scene06", "Scene18", "Scene20"), MARIGOLD_VARIATIONS),
    "marigold_val": (("Scene01",), MARIGOLD_VARIATIONS),
}  # fmt: skip
LIST_LINE = re.compile(r"(Scene\d+)/([^/]+)/frames/rgb/(Camera_\d+)/rgb_(\d+)\.jpg")


def _paths(src: Path, scene: str, variation: str, camera: str, frame: str) -> dict[str, str]:
    tail = (scene, variation, "frames")
    return dict(
        rgb=str(src.joinpath("vkitti_2.0.3_rgb", *tail, "rgb", camera, f"rgb_{frame}.jpg")),
        depth=str(src.joinpath("vkitti_2.0.3_depth", *tail, "depth", camera, f"depth_{frame}.png")),
        normals=str(src.joinpath("vkitti_DAG_normals", *tail, "normal", camera, f"normal_{frame}.png")),
    )


def list_inputs(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
    """Frames of the split list or of the chosen subset (every RGB file found in it)."""
    frames = []
    if split_list is not None:
        for number, line in enumerate(split_list.read_text().splitlines(), 1):
            if line.strip():
                match = LIST_LINE.search(line.split()[0])
                if match is None:
                    raise ValueError(f"{split_list}:{number}: no SceneXX/<variation>/frames/rgb/Camera_K/rgb_N.jpg")
                frames.append(match.groups())
    else:
        subset = options.get("subset", "e2e_ft")
        for rgb in (src / "vkitti_2.0.3_rgb").glob("Scene*/*/frames/rgb/Camera_*/rgb_*.jpg"):
            scene, variation, camera = rgb.parents[4].name, rgb.parents[3].name, rgb.parent.name
            if subset == "all" or (scene in SUBSETS[subset][0] and variation in SUBSETS[subset][1]):
                frames.append((scene, variation, camera, rgb.stem[len("rgb_") :]))
    info = {"root": str(src)}
    return [Input(make_key(*frame), _paths(src, *frame), info) for frame in frames], []


def convert(item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """One Virtual KITTI 2 frame -> encoded shard members."""
    rgb = read_rgb(require(Path(item.paths["rgb"]), "RGB image"))
    depth_path = require(Path(item.paths["depth"]), "depth PNG")
    units = read_png_units(depth_path)
    check_size(depth_path, units, rgb.shape[:2])
    height, width = units.shape
    top, left = kb_crop_box(height, width)
    window = np.s_[top : top + 352, left : left + 1216]
    depth = units[window] / 100.0
    normals = None
    if Path(item.paths["normals"]).is_file():
        normals_full = png_normals(Path(item.paths["normals"]))
        check_size(Path(item.paths["normals"]), normals_full, (height, width))
        normals = normalise(normals_full[window])
    elif options.get("require_normals"):
        raise SkipInput(f"missing normals: {item.paths['normals']}")
    mask = (depth > MIN_DEPTH) & (depth < MAX_DEPTH)
    meta = dict(
        source="vkitti2", domain="outdoor", split=options.get("split", "train"), depth_scale=0.01,
        min_depth=MIN_DEPTH, max_depth=MAX_DEPTH, intrinsics=[FOCAL, FOCAL, CX - left, CY - top],
        crop=[top, left, 352, 1216], original_size=[height, width], inputs=provenance(item), converter="vkitti2",
    )  # fmt: skip
    return encode_sample(item.key, rgb[window], depth, mask, normals, meta)


def add_arguments(parser: ArgumentParser) -> None:
    """Virtual KITTI 2 options: frame subset, normals requirement, split name."""
    parser.add_argument("--subset", choices=[*SUBSETS, "all"], default="e2e_ft",
                        help="frames to convert without a split list (default: e2e_ft, 21 260 frames)")  # fmt: skip
    parser.add_argument("--require-normals", action="store_true", help="skip frames without a normals PNG")
    parser.add_argument("--split", default="train", help="`split` metadata and shard prefix (default: train)")


DATASET = Dataset(
    name="vkitti2", prefix="train", shard_size=256, list_inputs=list_inputs, convert=convert,
    summary="Virtual KITTI 2 -> 352x1216 training shards (KITTI benchmark crop, depth in cm, optional normals)",
    add_arguments=add_arguments,
    layout="vkitti_2.0.3_rgb/SceneXX/<variation>/frames/rgb/Camera_K/rgb_NNNNN.jpg and "
    "vkitti_2.0.3_depth/SceneXX/<variation>/frames/depth/Camera_K/depth_NNNNN.png side by side "
    "(optional vkitti_DAG_normals/SceneXX/<variation>/frames/normal/Camera_K/normal_NNNNN.png)",
)  # fmt: skip
