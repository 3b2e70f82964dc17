"""Depth evaluation converters (Marigold archives): units, ranges, crops, masks, split lists and skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamodules.convert import DATASETS, run_conversion
from tests.helpers import corrupt, read_samples, save_jpg, save_png

RNG = np.random.default_rng(0)


def image(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def convert(name: str, src: Path, out: Path, split_list: Path | None = None):
    return run_conversion(DATASETS[name], src, out, split_list=split_list, progress=False)


def test_nyuv2_raw_millimetres_range_and_eigen_crop(tmp_path: Path):
    src = tmp_path / "nyuv2"
    depth = np.full((480, 640), 2500, dtype=np.uint16)
    depth[100, 100] = 0  # no Kinect return
    depth[101, 101] = 10000  # 10 m: outside (1e-3, 10)
    save_png(src / "test/kitchen_0004/rgb_0001.png", image(480, 640))
    save_png(src / "test/kitchen_0004/depth_0001.png", depth)
    save_png(src / "test/kitchen_0004/filled_0001.png", np.full((480, 640), 7000, dtype=np.uint16))  # never read
    save_png(src / "test/office_0005/rgb_0009.png", image(480, 640))
    corrupt(src / "test/office_0005/depth_0009.png")
    split = tmp_path / "filename_list_test.txt"
    split.write_text("".join(f"test/{s}/rgb_{i}.png test/{s}/depth_{i}.png test/{s}/filled_{i}.png\n"
                             for s, i in [("kitchen_0004", "0001"), ("office_0005", "0009")]))  # fmt: skip
    report = convert("nyuv2", src, tmp_path / "out", split)
    assert report.written == 1 and report.skipped[0].key == "nyuv2-office_0005-0009"
    sample = read_samples(tmp_path / "out")["nyuv2-kitchen_0004-0001"]
    np.testing.assert_allclose(sample["depth"][sample["mask"]], 2.5, rtol=1e-6)
    mask = sample["mask"]
    assert mask[45, 41] and mask[470, 600] and not mask[44, 300] and not mask[300, 40] and not mask[471, 300]
    assert not mask[300, 601] and not mask[100, 100] and not mask[101, 101]
    assert mask.sum() == (471 - 45) * (601 - 41) - 2
    meta = sample["meta"]
    assert meta["eval_crop"] == [45, 471, 41, 601] and meta["eval_mask"] == "range+eigen_crop"
    assert (meta["eval_min_depth"], meta["eval_max_depth"]) == (meta["min_depth"], meta["max_depth"]) == (1e-3, 10)
    assert meta["eval_protocol"] == "marigold_depth" and meta["eval_processing_resolution"] == 0
    assert meta["eval_alignment"] == "least_squares" and meta["eval_alignment_max_res"] is None
    assert meta["split"] == "test" and meta["domain"] == "indoor" and len(meta["intrinsics"]) == 4
    # without a split list every test/*/rgb_*.png is found
    assert convert("nyuv2", src, tmp_path / "glob").written == 1


def test_kitti_benchmark_crop_eigen_crop_and_none_ground_truth(tmp_path: Path):
    src = tmp_path / "kitti"
    h, w = 375, 1242  # KB crop: top 23, left 13
    rgb = image(h, w)
    units = np.zeros((h, w), dtype=np.uint16)  # sparse LiDAR: mostly empty
    units[23 + 200, 13 + 600] = 5 * 256 + 3  # inside the Eigen crop
    units[23 + 50, 13 + 600] = 256  # above the Eigen crop (rows 117:321)
    units[23 + 200, 13 + 20] = 90 * 256  # inside the crop but beyond 80 m
    save_png(src / "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png", rgb)
    save_png(src / "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png", units)
    split = tmp_path / "eigen_test_files_with_gt.txt"
    split.write_text(
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png "
        "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377\n"
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000070.png None 721.5377\n"
        "2011_09_26/2011_09_26_drive_0009_sync/image_02/data/0000000001.png "
        "2011_09_26_drive_0009_sync/proj_depth/groundtruth/image_02/0000000001.png 721.5377\n"
    )
    report = convert("kitti", src, tmp_path / "out", split)
    reasons = {s.key: s.reason for s in report.skipped}
    assert report.written == 1 and "None" in reasons["kitti-2011_09_26_drive_0002_sync-image_02-0000000070"]
    assert "missing RGB image" in reasons["kitti-2011_09_26_drive_0009_sync-image_02-0000000001"]
    sample = read_samples(tmp_path / "out")["kitti-2011_09_26_drive_0002_sync-image_02-0000000069"]
    assert sample["rgb"].shape == (352, 1216, 3) and np.array_equal(sample["rgb"], rgb[23:, 13:1229])
    assert np.argwhere(sample["mask"]).tolist() == [[200, 600]]
    assert sample["depth"][200, 600] == 5 + 3 / 256  # exact: depth_scale 1/256
    meta = sample["meta"]
    assert meta["eval_crop"] == [117, 321, 43, 1172] and meta["crop"] == [23, 13, 352, 1216]
    assert meta["focal"] == 721.5377 and meta["depth_scale"] == 1 / 256 and meta["eval_max_depth"] == 80
    assert convert("kitti", src, tmp_path / "glob").written == 1  # without a list: every ground-truth PNG


def test_eth3d_float_binary_infinite_and_per_sample_scale(tmp_path: Path):
    src = tmp_path / "eth3d"
    depth = np.full((8, 12), 3.25, dtype=np.float32)
    depth[0, 0] = np.inf
    depth[1, 1] = 20.0
    save_jpg(src / "rgb/courtyard/images/dslr_images/DSC_0286.JPG", image(8, 12))
    out_depth = src / "depth/courtyard_dslr_depth/courtyard/ground_truth_depth/dslr_images/DSC_0286.JPG"
    out_depth.parent.mkdir(parents=True)
    depth.tofile(out_depth)
    save_jpg(src / "rgb/office/images/dslr_images/DSC_0219.JPG", image(8, 12))
    bad = src / "depth/office_dslr_depth/office/ground_truth_depth/dslr_images/DSC_0219.JPG"
    bad.parent.mkdir(parents=True)
    depth[:4].tofile(bad)  # truncated file
    report = convert("eth3d", src, tmp_path / "out")
    assert report.written == 1 and "expected 8x12" in report.skipped[0].reason
    sample = read_samples(tmp_path / "out")["eth3d-courtyard-DSC_0286"]
    meta = sample["meta"]
    assert meta["depth_scale"] == 5e-4  # 20 m needs more than 0.2 mm units
    assert not sample["mask"][0, 0] and sample["mask"].sum() == 95
    np.testing.assert_allclose(sample["depth"][sample["mask"]].max(), 20.0, atol=2.5e-4)
    np.testing.assert_allclose(sample["depth"][2, 2], 3.25, atol=2.5e-4)
    assert meta["eval_max_depth"] is None and meta["max_depth"] == pytest.approx(65536 * 5e-4)
    assert meta["eval_processing_resolution"] == 756 and meta["eval_alignment_max_res"] == 1024
    assert meta["domain"] == "outdoor" and meta["eval_mask"] == "range"


def test_scannet_resizes_colour_to_depth(tmp_path: Path):
    src = tmp_path / "scannet"
    save_jpg(src / "scene0406_02/color/000300.jpg", image(16, 20))
    depth = np.full((8, 10), 1500, dtype=np.uint16)
    depth[0, :] = 0
    save_png(src / "scene0406_02/depth/000300.png", depth)
    assert convert("scannet", src, tmp_path / "out").written == 1
    sample = read_samples(tmp_path / "out")["scannet-scene0406_02-000300"]
    assert sample["rgb"].shape == (8, 10, 3) and sample["meta"]["rgb_resized_from"] == [16, 20]
    assert sample["mask"].sum() == 70
    np.testing.assert_allclose(sample["depth"][sample["mask"]], 1.5, rtol=1e-6)  # millimetres, float32 decode


def test_diode_uses_the_file_mask_and_clips_predictions_only(tmp_path: Path):
    src = tmp_path / "diode"
    folder = src / "outdoor/scene_00022/scan_00193"
    save_png(folder / "00022_00193_outdoor_000_010.png", image(6, 8))
    depth = np.full((6, 8, 1), 0.4, dtype=np.float32)  # below 0.6 m but valid in the file mask
    depth[0, 0, 0] = 120.0
    mask = np.ones((6, 8), dtype=np.float32)
    mask[5, :] = 0
    np.save(folder / "00022_00193_outdoor_000_010_depth.npy", depth)
    np.save(folder / "00022_00193_outdoor_000_010_depth_mask.npy", mask)
    split = tmp_path / "diode_val_all_filename_list.txt"
    stem = "outdoor/scene_00022/scan_00193/00022_00193_outdoor_000_010"
    split.write_text(f"{stem}.png {stem}_depth.npy {stem}_depth_mask.npy\n")
    assert convert("diode", src, tmp_path / "out", split).written == 1
    sample = read_samples(tmp_path / "out")["diode-00022_00193_outdoor_000_010"]
    assert sample["mask"].sum() == 40 and not sample["mask"][5].any()
    meta = sample["meta"]
    assert meta["depth_scale"] == 2e-3 and sample["depth"][0, 0] == pytest.approx(120.0)
    np.testing.assert_allclose(sample["depth"][1, 1], 0.4, atol=1e-3)
    assert (meta["eval_min_depth"], meta["eval_max_depth"], meta["eval_mask"]) == (0.6, 350.0, "file")
    assert meta["min_depth"] == 0.0 and meta["domain"] == "outdoor" and meta["split"] == "val"
    assert meta["eval_processing_resolution"] == 640
