"""Normals evaluation converters (DSINE's dsine_eval layout): PNG and EXR ground truth, masks, normals-only samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenEXR
import pytest

from datamodules.convert import DATASETS, run_conversion
from datamodules.shard_format import decode_sample, encode_sample
from datamodules.targets import build_targets
from tests.helpers import corrupt, read_samples, save_png

K = np.array([[518.8, 0, 325.6], [0, 519.5, 253.7], [0, 0, 1]])


def save_exr(path: Path, normals: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    channels = {c: np.ascontiguousarray(normals[..., i], dtype=np.float32) for i, c in enumerate("RGB")}
    with OpenEXR.File(header, channels) as exr:
        exr.write(str(path))


def test_png_ground_truth_mask_and_intrinsics(tmp_path: Path):
    src = tmp_path / "nyuv2"
    gt = np.zeros((8, 16, 3), dtype=np.uint8)  # black = no ground truth
    gt[2:, :] = (128, 255, 128)  # floor: (0, 1, 0)
    gt[2:, 8:] = (255, 128, 128)  # surface facing image-left: (1, 0, 0)
    save_png(src / "test/000000_img.png", np.full((8, 16, 3), 90, np.uint8))
    save_png(src / "test/000000_normal.png", gt)
    np.save(src / "test/000000_intrins.npy", K)
    save_png(src / "test/000001_img.png", np.zeros((8, 16, 3), np.uint8))
    corrupt(src / "test/000001_normal.png")
    split = tmp_path / "test.txt"
    split.write_text("test/000000_img.png\ntest/000001_img.png\n")
    report = run_conversion(DATASETS["nyuv2_normals"], src, tmp_path / "out", split_list=split, progress=False)
    assert report.written == 1 and report.skipped[0].key == "nyuv2-test-000001"
    sample = read_samples(tmp_path / "out")["nyuv2-test-000000"]
    assert sample["mask"].sum() == 6 * 16 and not sample["mask"][:2].any()
    assert (sample["depth"] == 0).all()
    # 8-bit ground truth survives exactly: re-quantising the decoded normals gives the PNG back
    assert np.array_equal(np.round((sample["normals"][2:] + 1) / 2 * 255), gt[2:])
    np.testing.assert_allclose(sample["normals"][4, 2], [0, 1, 0], atol=0.01)
    np.testing.assert_allclose(sample["normals"][4, 12], [1, 0, 0], atol=0.01)
    meta = sample["meta"]
    assert meta["has_depth"] is False and meta["eval_protocol"] == "dsine_normals" and meta["eval_mask"] == "rgb_sum>0"
    assert meta["intrinsics"] == pytest.approx([518.8, 519.5, 325.6, 253.7]) and meta["eval_processing_resolution"] == 0
    assert "min_depth" not in meta and meta["split"] == "test"
    # the batch contract keeps the normals mask of a normals-only sample
    targets = build_targets(sample)
    assert targets["mask"].sum() == 6 * 16 and (targets["depth"] == 0).all()
    assert targets["normals"][:, 4, 12].tolist() == pytest.approx([1, 0, 0], abs=0.01)


def test_exr_ground_truth_norm_mask(tmp_path: Path):
    src = tmp_path / "ibims"
    normals = np.zeros((6, 10, 3), dtype=np.float32)
    normals[:, :5] = (0.0, 0.0, 1.0)
    normals[:, 5:] = (0.6, 0.0, 0.8)
    normals[0, 0] = (0.3, 0.0, 0.0)  # too short: invalid (norm <= 0.5)
    save_png(src / "ibims/corridor_01_img.png", np.full((6, 10, 3), 50, np.uint8))
    save_exr(src / "ibims/corridor_01_normal.exr", normals)
    save_png(src / "ibims/factory_01_img.png", np.full((6, 10, 3), 50, np.uint8))
    corrupt(src / "ibims/factory_01_normal.exr")
    report = run_conversion(DATASETS["ibims"], src, tmp_path / "out", progress=False)
    assert report.written == 1 and report.skipped[0].key == "ibims-ibims-factory_01"
    sample = read_samples(tmp_path / "out")["ibims-ibims-corridor_01"]
    assert sample["mask"].sum() == 59 and not sample["mask"][0, 0]
    angle = np.degrees(np.arccos(np.clip((sample["normals"][1:] * normals[1:]).sum(-1), -1, 1)))
    assert angle.max() < 0.5  # 8-bit storage of float ground truth
    assert sample["meta"]["eval_mask"] == "norm>0.5" and "intrinsics" not in sample["meta"]


def test_sintel_keeps_native_size(tmp_path: Path):
    src = tmp_path / "sintel"
    save_png(src / "alley_1/frame_0001_img.png", np.zeros((5, 12, 3), np.uint8))
    save_exr(src / "alley_1/frame_0001_normal.exr", np.tile(np.float32([0, 0, 1]), (5, 12, 1)))
    assert run_conversion(DATASETS["sintel"], src, tmp_path / "out", progress=False).written == 1
    sample = read_samples(tmp_path / "out")["sintel-alley_1-frame_0001"]
    assert sample["rgb"].shape == (5, 12, 3) and sample["mask"].all() and sample["meta"]["domain"] == "outdoor"


def test_shard_format_normals_only_round_trip_and_depth_samples_unchanged():
    rgb, normals = np.zeros((2, 3, 3), np.uint8), np.tile(np.float32([0, 0, 1]), (2, 3, 1))
    mask = np.array([[True, False, True], [True, True, False]])
    only = decode_sample(encode_sample("n", rgb, np.full((2, 3), 7.0), mask, normals, {"has_depth": False}))
    assert np.array_equal(only["mask"], mask) and (only["depth"] == 0).all()
    with_depth = decode_sample(encode_sample("d", rgb, np.zeros((2, 3)), mask, normals, {}))
    assert not with_depth["mask"].any()  # depth samples: no depth, no valid pixel (as before)
