"""The surface-normal evaluation sets of DSINE's `dsine_eval` archive -> evaluation shards, docs/method.md §6.2.

`--src` is one dataset folder of the unpacked archive (`dsine_eval/<dataset>`); `--split-list` is DSINE's
`data/datasets/<dataset>/split/*.txt` (one `<scene>/<name>_img.png` per line, relative to `--src`); without it
every `*/*_img.png` is used. Per sample: `<name>_img.png` (RGB), `<name>_normal.png` or `<name>_normal.exr`
(ground truth, already in the training frame: x left, y up, z towards the viewer), `<name>_intrins.npy` (3x3 K).

| name | example path | GT | mask | count |
|---|---|---|---|---|
| `nyuv2_normals` | `test/000000_img.png` | 8-bit PNG, n = png / 255 x 2 - 1 (GeoNet) | R + G + B > 0 | 654 |
| `scannet_normals` | `scene0532_00/000000_img.png` | 8-bit PNG (FrameNet) | R + G + B > 0 | 300 |
| `ibims` | `ibims/corridor_01_img.png` | float EXR | norm > 0.5 | 100 |
| `sintel` | `alley_1/frame_0001_img.png` | float EXR (436x1024, not a multiple of 8) | norm > 0.5 | 1 064 |

The samples carry no depth: `has_depth` false, `depth.png` all zero, `mask.png` = the normals mask above,
`normals.png` the ground truth (8-bit: exact for the PNG sets, within about 0.4 degrees for the EXR sets).
Evaluation metadata: `eval_protocol` `dsine_normals`, `eval_mask` (the rule), `eval_processing_resolution` 0
(native), `eval_alignment` `none`, plus `intrinsics` from the npy file.
"""

from __future__ import annotations

from argparse import ArgumentParser
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.convert.common import SkipInput, check_size, make_key, normalise, read_exr_rgb, read_rgb, require
from datamodules.convert.runner import Dataset, Input, Skip, provenance
from datamodules.shard_format import encode_sample

# name -> (source, split, domain, ground-truth file suffix)
SETS = {
    "nyuv2_normals": ("nyuv2", "test", "indoor", "png"),
    "scannet_normals": ("scannet", "test", "indoor", "png"),
    "ibims": ("ibims", "test", "indoor", "exr"),
    "sintel": ("sintel", "test", "outdoor", "exr"),
}


def _lister(name: str):
    def list_inputs(src: Path, split_list: Path | None, options: dict[str, Any]) -> tuple[list[Input], list[Skip]]:
        """DSINE samples: split list lines or every `*/*_img.png`."""
        if split_list is not None:
            images = [line.split()[0] for line in split_list.read_text().splitlines() if line.strip()]
        else:
            images = [str(p.relative_to(src)) for p in src.glob("*/*_img.png")]
        inputs = []
        for image in images:
            if "_img" not in Path(image).name:
                raise ValueError(f"{split_list or src}: {image} is not a DSINE `<name>_img.<ext>` image")
            stem = Path(image).name.split("_img")[0]
            folder = src / Path(image).parent
            paths = dict(
                rgb=str(src / image), normals=str(folder / f"{stem}_normal.{SETS[name][3]}"),
                intrinsics=str(folder / f"{stem}_intrins.npy"),
            )  # fmt: skip
            inputs.append(Input(make_key(SETS[name][0], Path(image).parent.name, stem), paths, {"root": str(src)}))
        return inputs, []

    return list_inputs


def _ground_truth(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(normals HxWx3, mask HxW, mask rule) with the DSINE loaders' validity rules."""
    if kind == "png":
        quantised = read_rgb(path)
        return quantised.astype(np.float32) / 255 * 2 - 1, quantised.astype(int).sum(-1) > 0, "rgb_sum>0"
    normals = read_exr_rgb(path)
    return normals, np.linalg.norm(np.nan_to_num(normals), axis=-1) > 0.5, "norm>0.5"


def convert(name: str, item: Input, options: dict[str, Any]) -> dict[str, Any]:
    """One DSINE sample of set `name` -> normals-only shard members."""
    source, split, domain, kind = SETS[name]
    rgb = read_rgb(require(Path(item.paths["rgb"]), "RGB image"))
    normals_path = require(Path(item.paths["normals"]), "ground-truth normals")
    normals, mask, rule = _ground_truth(normals_path, kind)
    check_size(normals_path, normals, rgb.shape[:2])
    if not mask.any():
        raise SkipInput("no valid ground-truth normal")
    normals = np.where(mask[..., None], normalise(normals), 0.0)
    meta: dict[str, Any] = dict(
        source=source, domain=domain, split=split, has_depth=False, eval_protocol="dsine_normals",
        eval_mask=rule, eval_processing_resolution=0, eval_alignment="none", inputs=provenance(item), converter=name,
    )  # fmt: skip
    if Path(item.paths["intrinsics"]).is_file():
        k = np.load(item.paths["intrinsics"])
        if k.shape != (3, 3):
            raise SkipInput(f"{item.paths['intrinsics']}: intrinsics must be 3x3, got {k.shape}")
        meta["intrinsics"] = [float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])]
    depth = np.zeros(rgb.shape[:2], dtype=np.float32)
    return encode_sample(item.key, rgb, depth, mask, normals, meta)


def _no_arguments(parser: ArgumentParser) -> None:
    """No dataset-specific options."""


COUNTS = {"nyuv2_normals": "654", "scannet_normals": "300", "ibims": "100", "sintel": "1 064"}
DATASETS = [
    Dataset(name, SETS[name][1], 16, _lister(name), partial(convert, name),
            f"{SETS[name][0]} normals (DSINE dsine_eval) -> {COUNTS[name]} normals evaluation samples, native size",
            _no_arguments,
            "<scene>/<name>_img.png with <name>_normal.png (or .exr) and <name>_intrins.npy, in one dsine_eval/<dataset> folder")
    for name in SETS
]  # fmt: skip
