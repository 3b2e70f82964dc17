"""Hypersim converter on tiny files in the raw release layout; also the runner (resume, skips, workers, plan)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from datamodules.convert import DATASETS, run_conversion
from datamodules.convert.__main__ import main
from datamodules.convert.hypersim import tone_map
from tests.helpers import corrupt, read_samples, save_png

H, W = 12, 16
FOCAL = 886.81 * W / 1024  # 60 degree horizontal field of view


def save_h5(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=array)


def wall_distance(planar: float) -> np.ndarray:
    """Distance image of a fronto-parallel wall at `planar` metres (principal point at the centre)."""
    x = np.arange(W) - W / 2 + 0.5
    y = np.arange(H) - H / 2 + 0.5
    return planar * np.sqrt(x[None] ** 2 + y[:, None] ** 2 + FOCAL**2) / FOCAL


def write_frame(root: Path, frame: int, colour: np.ndarray, distance: np.ndarray, entity: np.ndarray,
                normals: np.ndarray | None = None, preview: np.ndarray | None = None) -> None:  # fmt: skip
    images = root / "ai_001_001" / "images"
    save_h5(images / "scene_cam_00_final_hdf5" / f"frame.{frame:04d}.color.hdf5", colour.astype(np.float16))
    geometry = images / "scene_cam_00_geometry_hdf5"
    save_h5(geometry / f"frame.{frame:04d}.depth_meters.hdf5", distance.astype(np.float16))
    save_h5(geometry / f"frame.{frame:04d}.render_entity_id.hdf5", entity.astype(np.int32))
    if normals is not None:
        save_h5(geometry / f"frame.{frame:04d}.normal_cam.hdf5", normals.astype(np.float32))
    if preview is not None:
        save_png(images / "scene_cam_00_geometry_preview" / f"frame.{frame:04d}.normal_cam.png", preview)


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    """Frame 0: wall at 3 m, hdf5 normals, 2x2 invalid corner; frame 1: wall at 5 m, PNG normals; frame 2 corrupt."""
    root = tmp_path / "raw"
    entity = np.ones((H, W), dtype=np.int32)
    entity[:2, :2] = -1
    colour = np.full((H, W, 3), 0.5)
    normals = np.zeros((H, W, 3))
    normals[:, : W // 2] = (0, 0, -1)  # a wall stored facing away: must be flipped towards the camera
    normals[:, W // 2 :] = (-1, 0, 0)  # right half: facing image-left (Hypersim x points right)
    write_frame(root, 0, colour, wall_distance(3.0), entity, normals=normals)
    preview = np.full((H, W, 3), (128, 128, 255), dtype=np.uint8)  # (0, 0, 1): camera-facing in Hypersim's frame
    write_frame(root, 1, colour, wall_distance(5.0), np.ones((H, W)), preview=preview)
    write_frame(root, 2, colour, wall_distance(4.0), np.ones((H, W)))
    corrupt(root / "ai_001_001/images/scene_cam_00_final_hdf5/frame.0002.color.hdf5")
    return root


def test_tone_mapping_of_known_values():
    grey = np.linspace(0.1, 1.0, 10)
    rgb = np.repeat(np.append(grey, 100.0)[None, :, None], 3, axis=2)  # 1x11, last pixel invalid and very bright
    valid = np.append(np.ones(10, bool), False)[None]
    image, scale = tone_map(rgb, valid)
    p90 = 0.91  # numpy's linear 90th percentile of 0.1 .. 1.0
    assert scale == pytest.approx(0.8**2.2 / p90)
    assert image[0, 8, 0] == int(0.8 * (0.9 / p90) ** (1 / 2.2) * 255)
    assert image[0, 9, 0] == int(0.8 * (1.0 / p90) ** (1 / 2.2) * 255) == 212
    assert image[0, 10, 0] == 255  # clipped
    # no valid pixel: scale 1; a dark image (p90 < 1e-4): scale 0, black
    assert tone_map(np.full((1, 1, 3), 0.25), np.zeros((1, 1), bool))[0][0, 0, 0] == int(0.25 ** (1 / 2.2) * 255)
    dark, dark_scale = tone_map(np.full((2, 2, 3), 5e-5), np.ones((2, 2), bool))
    assert dark_scale == 0 and (dark == 0).all()


def test_native_conversion_planar_depth_mask_and_normals(raw: Path, tmp_path: Path):
    out = tmp_path / "shards"
    report = run_conversion(
        DATASETS["hypersim"], raw, out, shard_size=2, options={"native": True}, workers=2, progress=False
    )
    assert report.written == 2 and [s.key for s in report.skipped] == ["ai_001_001-cam_00-0002"]
    samples = read_samples(out)
    first = samples["ai_001_001-cam_00-0000"]
    assert first["rgb"].shape == (H, W, 3)
    np.testing.assert_allclose(first["depth"][first["mask"]], 3.0, atol=0.0015)  # planar wall, mm (float16 input)
    assert not first["mask"][:2, :2].any() and first["mask"].sum() == H * W - 4 and (first["depth"][:2, :2] == 0).all()
    # tone mapping: uniform grey 0.5 -> exactly 0.8 after scaling by 0.8^2.2 / p90
    assert (first["rgb"][first["mask"]] == 204).all()
    np.testing.assert_allclose(first["normals"][2:, : W // 2], np.broadcast_to([0, 0, 1], (H - 2, W // 2, 3)),
                               atol=0.01)  # fmt: skip
    np.testing.assert_allclose(first["normals"][:, W // 2 :], np.broadcast_to([1, 0, 0], (H, W // 2, 3)), atol=0.01)
    meta = first["meta"]
    assert meta["source"] == "hypersim" and meta["domain"] == "indoor" and meta["depth_scale"] == 0.001
    assert (meta["min_depth"], meta["max_depth"]) == (1e-5, 65.0)
    assert meta["intrinsics"] == pytest.approx([FOCAL, FOCAL, W / 2, H / 2])
    assert meta["normals_source"] == "normal_cam.hdf5" and "color" in meta["inputs"]
    second = samples["ai_001_001-cam_00-0001"]
    np.testing.assert_allclose(second["depth"][second["mask"]], 5.0, atol=0.003)
    np.testing.assert_allclose(second["normals"], np.broadcast_to([0, 0, 1], (H, W, 3)), atol=0.01)
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped[0]["key"] == "ai_001_001-cam_00-0002" and "color.hdf5" in skipped[0]["paths"]["color"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["written"] == 2 and manifest["skipped"] == 1 and manifest["samples_per_shard"] == [2, 0]


def test_resize_is_nearest_for_depth_and_scales_intrinsics(raw: Path, tmp_path: Path):
    native = read_samples_of(raw, tmp_path / "native", native=True)
    small = read_samples_of(raw, tmp_path / "small", size=(6, 8))
    for key, sample in small.items():
        assert sample["rgb"].shape == (6, 8, 3) and sample["meta"]["resized_from"] == [H, W]
        # centre-aligned nearest: output (i, j) reads input (2i + 1, 2j + 1)
        np.testing.assert_array_equal(sample["depth"], native[key]["depth"][1::2, 1::2])
        assert sample["meta"]["intrinsics"] == pytest.approx([FOCAL / 2, FOCAL / 2, 4, 3])
        np.testing.assert_allclose(np.linalg.norm(sample["normals"], axis=-1), 1.0, atol=0.01)


def read_samples_of(raw: Path, out: Path, **options) -> dict:
    run_conversion(DATASETS["hypersim"], raw, out, options=options, progress=False)
    return read_samples(out)


def test_resume_skips_finished_shards_and_keeps_the_skip_report(raw: Path, tmp_path: Path, capsys):
    out = tmp_path / "shards"
    first = run_conversion(DATASETS["hypersim"], raw, out, shard_size=1, options={"native": True}, progress=False)
    assert [p.name for p in first.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    stamps = {p.name: p.stat().st_mtime_ns for p in first.shards}
    (out / "train-000001.tar").unlink()  # as if the run had stopped before this shard
    again = run_conversion(DATASETS["hypersim"], raw, out, shard_size=1, options={"native": True}, workers=2,
                           progress=False)  # fmt: skip
    assert again.written == 2 and [s.key for s in again.skipped] == ["ai_001_001-cam_00-0002"]
    assert (out / "train-000000.tar").stat().st_mtime_ns == stamps["train-000000.tar"]
    assert (out / "train-000002.tar").stat().st_mtime_ns == stamps["train-000002.tar"]
    assert set(read_samples(out)) == {"ai_001_001-cam_00-0000", "ai_001_001-cam_00-0001"}
    assert "1 inputs skipped" in capsys.readouterr().out
    assert not list(out.glob("*.tmp"))
    with pytest.raises(ValueError, match="another plan"):
        run_conversion(DATASETS["hypersim"], raw, out, shard_size=2, options={"native": True}, progress=False)


def test_split_lists_csv_and_marigold_and_required_normals(raw: Path, tmp_path: Path):
    csv_list = tmp_path / "metadata_images_split_scene_v1.csv"
    csv_list.write_text(
        "scene_name,camera_name,frame_id,included_in_public_release,exclude_reason,split_partition_name\n"
        "ai_001_001,cam_00,0,True,,train\nai_001_001,cam_00,1,True,,val\nai_001_001,cam_00,2,False,,train\n"
    )
    report = run_conversion(DATASETS["hypersim"], raw, tmp_path / "csv", split_list=csv_list, progress=False)
    assert report.written == 1 and not report.skipped
    marigold = tmp_path / "filename_list_train_filtered.txt"
    marigold.write_text("ai_001_001/rgb_cam_00_fr0001.png ai_001_001/depth_plane_cam_00_fr0001.png\n")
    samples = read_samples_of_list(raw, tmp_path / "txt", marigold)
    assert list(samples) == ["ai_001_001-cam_00-0001"]
    assert samples["ai_001_001-cam_00-0001"]["rgb"].shape == (480, 640, 3)  # default size
    # without normals a frame is written without them, or skipped when normals are required
    (raw / "ai_001_001/images/scene_cam_00_geometry_preview/frame.0001.normal_cam.png").unlink()
    plain = read_samples_of_list(raw, tmp_path / "plain", marigold, native=True)
    assert "normals" not in plain["ai_001_001-cam_00-0001"]
    strict = run_conversion(DATASETS["hypersim"], raw, tmp_path / "strict", split_list=marigold,
                            options={"require_normals": True}, progress=False)  # fmt: skip
    assert strict.written == 0 and "missing normals" in strict.skipped[0].reason


def read_samples_of_list(raw: Path, out: Path, split_list: Path, **options) -> dict:
    run_conversion(DATASETS["hypersim"], raw, out, split_list=split_list, options=options, progress=False)
    return read_samples(out)


def test_command_line(raw: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    status = main(["hypersim", "--src", str(raw), "--out", str(out), "--native", "--shard-size", "8",
                   "--partition", "val", "--quiet"])  # fmt: skip
    assert status == 0 and (out / "val-000000.tar").is_file()
    assert {s["meta"]["split"] for s in read_samples(out).values()} == {"val"}
    assert "skipped ai_001_001-cam_00-0002" in capsys.readouterr().out
    assert main(["hypersim", "--src", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "raw hypersim folder not found" in capsys.readouterr().err
