"""A real photograph with real depth, offline: Middlebury 2014 "Motorcycle" as shipped by scikit-image.

`skimage.data.stereo_motorcycle()` returns the left view (500x741, 4x downsampled) and its ground-truth disparity.
With the calibration of the function's docstring (valid for the downsampled pair), depth = f * B / (d + doffs):
f = 994.978 px, B = 193.001 mm, doffs = 31.086 px. Missing disparities are inf in the shipped array (the docstring
says NaN): both, and any non-positive depth, are invalid. The data is derived from the installed package at run
time and written as one evaluation shard in the project's shard format; nothing of it is committed.

    python -m datamodules.middlebury --out data/shards/middlebury   # then configs/eval/middlebury.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from datamodules.shard_format import encode_sample
from datamodules.shard_writer import AtomicShardWriter

FOCAL_PX = 994.978
BASELINE_M = 0.193001
DOFFS_PX = 31.086
PRINCIPAL_POINT = (311.193, 254.877)
MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0  # evaluation clip range (indoor scene at 2-5 m)
PROCESSING_RESOLUTION = 128  # the stand-in models' training size (configs/eval/middlebury.yaml)
KEY = "middlebury2014-motorcycle"


def disparity_to_depth(disparity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth in metres and validity (finite disparity, positive depth) from the downsampled disparity map."""
    disparity = np.asarray(disparity, dtype=np.float64)
    valid = np.isfinite(disparity) & (disparity + DOFFS_PX > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(valid, FOCAL_PX * BASELINE_M / (disparity + DOFFS_PX), 0.0)
    return depth.astype(np.float32), valid


def load_motorcycle() -> dict[str, np.ndarray]:
    """rgb uint8 HxWx3, depth float32 HxW (metres, 0 = invalid), mask bool HxW, from the installed scikit-image."""
    try:
        from skimage.data import stereo_motorcycle
    except ImportError as err:
        raise ImportError(
            "the Middlebury sample comes from scikit-image: pip install scikit-image (part of the dev extra)"
        ) from err
    left, _right, disparity = stereo_motorcycle()
    depth, mask = disparity_to_depth(disparity)
    return {"rgb": np.ascontiguousarray(left, dtype=np.uint8), "depth": depth, "mask": mask}


def write_middlebury_shard(out_dir: str | Path) -> Path:
    """Write `<out_dir>/test-000000.tar` (one sample, evaluation metadata of the Marigold protocol); reused if present."""
    sample = load_motorcycle()
    height, width = sample["depth"].shape
    meta = dict(
        source="middlebury2014",
        domain="indoor",
        split="test",
        depth_scale=0.0001,  # 0.1 mm units keep the stereo depth's precision in 16 bits (max 6.5 m)
        min_depth=MIN_DEPTH,
        max_depth=MAX_DEPTH,
        intrinsics=[FOCAL_PX, FOCAL_PX, *PRINCIPAL_POINT],
        height=height,
        width=width,
        eval_protocol="marigold_depth",
        eval_min_depth=MIN_DEPTH,
        eval_max_depth=MAX_DEPTH,
        eval_mask="range",
        eval_crop=None,
        eval_processing_resolution=PROCESSING_RESOLUTION,
        eval_alignment="least_squares",
        eval_alignment_max_res=None,
        provenance="skimage.data.stereo_motorcycle (Middlebury 2014, 4x downsampled)",
    )
    encoded = encode_sample(KEY, sample["rgb"], sample["depth"], sample["mask"], None, meta)
    return AtomicShardWriter(out_dir, "test").write(0, [encoded])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m datamodules.middlebury", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/shards/middlebury"), help="shard folder")
    path = write_middlebury_shard(parser.parse_args(argv).out)
    print(path)
    return path


if __name__ == "__main__":
    main()
