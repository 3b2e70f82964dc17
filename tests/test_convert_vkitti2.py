"""Virtual KITTI 2 converter on tiny files in the release layout: crop offsets, centimetres, sky, normals, subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamodules.convert import DATASETS, run_conversion
from tests.helpers import corrupt, read_samples, save_jpg, save_png

H, W = 375, 1242  # native size: crop top = 23, left = 13


def write_frame(root: Path, scene: str, variation: str, frame: int, depth_cm: np.ndarray,
                normals: np.ndarray | None = None) -> None:  # fmt: skip
    tail = Path(scene, variation, "frames")
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[:, :, 0] = (np.arange(W) % 256)[None]  # column index in red: reveals the horizontal crop offset
    save_jpg(root / "vkitti_2.0.3_rgb" / tail / "rgb" / "Camera_0" / f"rgb_{frame:05d}.jpg", rgb)
    save_png(root / "vkitti_2.0.3_depth" / tail / "depth" / "Camera_0" / f"depth_{frame:05d}.png", depth_cm)
    if normals is not None:
        save_png(root / "vkitti_DAG_normals" / tail / "normal" / "Camera_0" / f"normal_{frame:05d}.png", normals)


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    depth = np.full((H, W), 1234, dtype=np.uint16)  # 12.34 m
    depth[23, 13] = 65535  # sky inside the crop
    depth[24, 14] = 8000  # exactly 80 m: outside (1e-5, 80)
    depth[:23] = 1  # rows above the crop
    normals = np.zeros((H, W, 3), dtype=np.uint8)
    normals[..., 2] = 255
    normals[..., :2] = 128
    normals[23, 13] = (255, 128, 128)  # (1, 0, 0) at the crop's top-left corner
    write_frame(root, "Scene01", "morning", 0, depth, normals)
    write_frame(root, "Scene01", "clone", 0, depth)  # not in the E2E-FT subset
    write_frame(root, "Scene02", "fog", 3, depth)
    corrupt(root / "vkitti_2.0.3_depth/Scene02/fog/frames/depth/Camera_0/depth_00003.png")
    return root


def test_crop_units_mask_and_normals(raw: Path, tmp_path: Path):
    out = tmp_path / "shards"
    report = run_conversion(DATASETS["vkitti2"], raw, out, progress=False)
    assert report.written == 1 and [s.key for s in report.skipped] == ["Scene02-fog-Camera_0-00003"]
    sample = read_samples(out)["Scene01-morning-Camera_0-00000"]
    assert sample["rgb"].shape == (352, 1216, 3) and sample["depth"].shape == (352, 1216)
    assert abs(int(sample["rgb"][100, 0, 0]) - 13) <= 3 and abs(int(sample["rgb"][100, 100, 0]) - 113) <= 3  # jpg
    assert not sample["mask"][0, 0] and not sample["mask"][1, 1]  # sky and 80 m are invalid
    assert sample["mask"].sum() == 352 * 1216 - 2
    np.testing.assert_allclose(sample["depth"][sample["mask"]], 12.34, atol=1e-5)
    np.testing.assert_allclose(sample["normals"][0, 0], [1, 0, 0], atol=0.01)
    np.testing.assert_allclose(sample["normals"][5, 5], [0, 0, 1], atol=0.01)
    meta = sample["meta"]
    assert meta["depth_scale"] == 0.01 and (meta["min_depth"], meta["max_depth"]) == (1e-5, 80.0)
    assert meta["crop"] == [23, 13, 352, 1216] and meta["original_size"] == [H, W]
    assert meta["intrinsics"] == pytest.approx([725.0087, 725.0087, 620.5 - 13, 187 - 23])
    assert meta["domain"] == "outdoor" and meta["source"] == "vkitti2"


def test_subsets_and_split_list(raw: Path, tmp_path: Path):
    everything = run_conversion(DATASETS["vkitti2"], raw, tmp_path / "all", options={"subset": "all"}, progress=False)
    assert everything.written == 2
    val = run_conversion(DATASETS["vkitti2"], raw, tmp_path / "val", options={"subset": "marigold_val"}, progress=False)
    assert val.written == 2
    assert set(read_samples(tmp_path / "val")) == {"Scene01-clone-Camera_0-00000", "Scene01-morning-Camera_0-00000"}
    with pytest.raises(ValueError, match="no inputs found"):  # Scenes 02, 06, 18, 20 without fog: nothing here
        run_conversion(DATASETS["vkitti2"], raw, tmp_path / "mg", options={"subset": "marigold"}, progress=False)
    listed = tmp_path / "vkitti_val.txt"
    listed.write_text(
        "rgb/Scene01/clone/frames/rgb/Camera_0/rgb_00000.jpg "
        "depth/Scene01/clone/frames/depth/Camera_0/depth_00000.png\n"
    )
    report = run_conversion(DATASETS["vkitti2"], raw, tmp_path / "list", split_list=listed, progress=False)
    assert report.written == 1 and "normals" not in read_samples(tmp_path / "list")["Scene01-clone-Camera_0-00000"]


def test_too_small_images_are_skipped(tmp_path: Path):
    root = tmp_path / "raw"
    tail = Path("Scene01", "morning", "frames")
    save_jpg(root / "vkitti_2.0.3_rgb" / tail / "rgb/Camera_0/rgb_00000.jpg", np.zeros((300, 1000, 3), np.uint8))
    save_png(root / "vkitti_2.0.3_depth" / tail / "depth/Camera_0/depth_00000.png", np.ones((300, 1000), np.uint16))
    report = run_conversion(DATASETS["vkitti2"], root, tmp_path / "out", progress=False)
    assert report.written == 0 and "smaller than the KITTI benchmark crop" in report.skipped[0].reason
