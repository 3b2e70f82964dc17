"""Evaluation protocol: oracle predictions score 0, clip range, pooled normals, padding under DDP, tables, configs."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules import middlebury
from datamodules.convert import marigold_eval
from datamodules.datamodule import ShardDataModule
from datamodules.shard_format import encode_sample
from datamodules.shard_writer import ShardWriter
from lightning_modules.ensemble import DEPTH_ENSEMBLE_PRESETS
from lightning_modules.evaluation import EvalSpec, check_protocol, crop_mask, prepare_input
from lightning_modules.module import GeometryEstimator
from lightning_modules.tiny import TinySpec
from tests.helpers import ROOT


def depth_sample(index: int, height: int = 20, width: int = 28) -> tuple[dict, np.ndarray]:
    """RGB grey level k encodes depth 1 + 0.01 k m exactly (mm units): mean RGB is affine in depth."""
    rng = np.random.default_rng(index)
    level = rng.integers(0, 256, (height, width))
    depth = (1000 + 10 * level) / 1000.0
    mask = np.ones((height, width), bool)
    mask[: 2 + index, :3] = False  # a different valid count per image
    rgb = np.repeat(level[..., None], 3, axis=-1).astype(np.uint8)
    return encode_sample(f"d{index}", rgb, depth.astype(np.float32), mask, meta={"source": "t"}), np.where(
        mask, depth, 0
    )


def write_depth_set(folder: Path, count: int, height: int = 20, width: int = 28) -> list[np.ndarray]:
    depths = []
    with ShardWriter(folder, "test", 2) as writer:
        for index in range(count):
            sample, depth = depth_sample(index, height, width)
            writer.write(sample)
            depths.append(depth)
    return depths


def oracle_depth(model: GeometryEstimator) -> GeometryEstimator:
    """Replace the network by the image's channel mean, an affine function of the true depth (see depth_sample)."""
    model.core.encode = lambda rgb: rgb  # the "latent" is the image itself, sampling and decoding keep it
    model.core.sample = lambda z, spec: z
    model.core.decode = lambda z: z  # DepthTask.from_decoded takes the channel mean, clamped to [-1, 1]
    return model


def run_test(model: GeometryEstimator, shards: Path, tmp_path: Path, batch_size: int = 2) -> tuple[dict, Path]:
    dm = ShardDataModule(test_shards=str(shards / "test-*.tar"), val_batch_size=batch_size, num_workers=0)
    logger = TensorBoardLogger(str(tmp_path / "runs"), name="eval")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.test(model, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}, Path(trainer.log_dir)


@pytest.fixture(scope="module")
def depth_model() -> GeometryEstimator:
    return GeometryEstimator(tiny=TinySpec(seed=0))


def test_perfect_up_to_affine_prediction_scores_zero_through_the_protocol(tmp_path, depth_model):
    write_depth_set(tmp_path / "set", 3)  # 20x28: padded to 24x32 for the VAE and unpadded
    model = oracle_depth(copy.deepcopy(depth_model))
    model.evaluation = EvalSpec(dataset="oracle", min_depth=1e-3, max_depth=10.0)
    model.configure_metrics()
    metrics, folder = run_test(model, tmp_path / "set", tmp_path)
    assert metrics["test/abs_rel"] < 1e-5 and metrics["test/rmse"] < 1e-4
    assert metrics["test/delta1"] == 1.0 and metrics["test/images"] == 3

    rows = list(csv.DictReader((folder / "metrics_oracle.csv").open()))
    assert len(rows) == 1 and rows[0]["dataset"] == "oracle" and rows[0]["images"] == "3"
    assert float(rows[0]["abs_rel"]) == pytest.approx(metrics["test/abs_rel"], rel=1e-6)
    assert float(rows[0]["delta1"]) == 1.0
    lines = (folder / "metrics_oracle.md").read_text().splitlines()
    assert lines[0].startswith("| dataset | images | AbsRel (%) |") and "δ1 (%)" in lines[0]
    assert lines[2].startswith("| oracle | 3 | 0.000 |") and "| 100.000 |" in lines[2]


def test_clip_range_is_applied_to_aligned_predictions(tmp_path, depth_model):
    depths = write_depth_set(tmp_path / "set", 3)  # depths 1 .. 3.55 m
    model = oracle_depth(copy.deepcopy(depth_model))
    # The range clips predictions only (DIODE style), so ground truth beyond 2 m still counts.
    model.evaluation = EvalSpec(dataset="clipped", min_depth=1e-3, max_depth=2.0, mask_gt_range=False)
    model.configure_metrics()
    metrics, folder = run_test(model, tmp_path / "set", tmp_path)
    # Aligned prediction = ground truth, clipped at 2 m: AbsRel = mean of max(g - 2, 0) / g, per image, then mean.
    per_image = [float(np.mean(np.maximum(d[d > 0] - 2.0, 0) / d[d > 0])) for d in depths]
    delta1 = [float(np.mean(d[d > 0] / 2.0 < 1.25)) for d in depths]
    assert metrics["test/abs_rel"] == pytest.approx(np.mean(per_image), rel=1e-4)
    assert metrics["test/delta1"] == pytest.approx(np.mean(delta1), abs=1e-6)
    row = next(csv.DictReader((folder / "metrics_clipped.csv").open()))
    assert float(row["abs_rel"]) == pytest.approx(np.mean(per_image), rel=1e-4)


def test_padding_in_a_two_rank_simulation_is_not_counted(tmp_path, monkeypatch, depth_model):
    write_depth_set(tmp_path / "set", 5, 8, 16)  # 5 images over 2 ranks: rank 1 gets a padded slot
    dm = ShardDataModule(test_shards=str(tmp_path / "set" / "test-*.tar"), val_batch_size=2, num_workers=0)
    model = oracle_depth(copy.deepcopy(depth_model))
    # Clipping at 2 m makes every metric non-trivial and different per image.
    model.evaluation = EvalSpec(dataset="ddp", min_depth=1e-3, max_depth=2.0, mask_gt_range=False)
    model.configure_metrics()

    def evaluate(rank: int, world: int) -> tuple:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        model.test_metrics.reset()
        model.test_images.reset()
        keys = []
        for index, batch in enumerate(dm.test_dataloader()):
            keys += batch["key"]
            model.test_step(batch, index)
        return copy.deepcopy(model.test_metrics), copy.deepcopy(model.test_images), keys

    single, single_images, _ = evaluate(0, 1)
    (rank0, images0, keys0), (rank1, images1, keys1) = evaluate(0, 2), evaluate(1, 2)
    assert "__pad__" in keys1 and len(keys0) == len(keys1) == 3
    rank0.merge_state(rank1)  # what the sum reduction of DDP does
    images0.merge_state(images1)
    assert {k: v.item() for k, v in rank0.compute().items()} == {k: v.item() for k, v in single.compute().items()}
    assert images0.compute().item() == single_images.compute().item() == 5
    assert rank0.count.item() == 5 and rank0.skipped.item() == 0


def normals_sample(key: str, normal: tuple[int, int, int], valid: list[tuple[int, int]]) -> dict:
    rgb = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), bool)
    for row, col in valid:
        mask[row, col] = True
    normals = np.broadcast_to(np.array(normal, np.float32) / 255 * 2 - 1, (8, 8, 3)).copy()
    meta = {"source": "t", "has_depth": False}
    return encode_sample(key, rgb, np.zeros((8, 8), np.float32), mask, normals, meta=meta)


def test_normal_errors_are_pooled_over_pixels_not_images(tmp_path):
    # Image A: 1 valid pixel facing image-left; image B: 3 valid pixels facing the camera.
    with ShardWriter(tmp_path / "set", "test", 4) as writer:
        writer.write(normals_sample("a", (255, 128, 128), [(0, 0)]))
        writer.write(normals_sample("b", (128, 128, 255), [(1, 1), (2, 2), (3, 3)]))
    model = GeometryEstimator(tiny=TinySpec(seed=0), task="normals", evaluation=EvalSpec(dataset="pooled"))
    facing = torch.nn.functional.normalize(torch.tensor([128, 128, 255.0]) / 255 * 2 - 1, dim=0)
    model.core.encode = lambda rgb: rgb
    model.core.sample = lambda z, spec: z
    model.core.decode = lambda z: facing.view(1, 3, 1, 1).expand(z.shape[0], 3, *z.shape[-2:])
    metrics, folder = run_test(model, tmp_path / "set", tmp_path)
    left = torch.nn.functional.normalize(torch.tensor([255, 128, 128.0]) / 255 * 2 - 1, dim=0)
    angle = math.degrees(math.acos(float(left @ facing)))  # about 89.8 degrees
    assert metrics["test/mean"] == pytest.approx(angle / 4, abs=1e-3)  # per-image means would give angle / 2
    assert metrics["test/a11_25"] == pytest.approx(75.0) and metrics["test/median"] < 0.01
    assert metrics["test/images"] == 2
    header = (folder / "metrics_pooled.md").read_text().splitlines()[0]
    assert header.startswith("| dataset | images | mean (°) | median (°) |")


def test_eigen_crops_from_fractions():
    def box(mask: torch.Tensor) -> tuple[int, int, int, int]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1

    nyu = yaml.safe_load((ROOT / "configs/eval/nyuv2.yaml").read_text())["model"]["init_args"]["evaluation"]["crop"]
    kitti = yaml.safe_load((ROOT / "configs/eval/kitti.yaml").read_text())["model"]["init_args"]["evaluation"]["crop"]
    assert box(crop_mask(torch.ones(480, 640, dtype=torch.bool), nyu)) == (45, 471, 41, 601)
    assert box(crop_mask(torch.ones(352, 1216, dtype=torch.bool), kitti)) == (117, 321, 43, 1172)
    partial = torch.zeros(480, 640, dtype=torch.bool)
    partial[:100] = True
    assert crop_mask(partial, nyu).sum() == (100 - 45) * (601 - 41)  # ANDed with the ground-truth mask


def test_dsine_minmax_input_reproduces_the_reference_quirk():
    # One image with black, white and mid-grey (127) pixels: ImageNet-normalised, stretched over the whole
    # tensor (min = black's red channel, max = white's blue channel) and truncated to 8 bits.
    image = torch.tensor([0.0, 1.0, 127 / 255]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = prepare_input(image, "dsine_minmax") * 255
    assert out[0, :, 0, 2].round().tolist() == [116.0, 123.0, 135.0]
    assert out[0, 0, 0, 0] == 0 and out[0, 2, 0, 1] == 255
    assert torch.equal(prepare_input(image, "exact"), image)


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="crop"):
        EvalSpec(crop=(0.5, 0.4, 0.0, 1.0))
    with pytest.raises(ValueError, match="processing_resolution"):
        EvalSpec(processing_resolution=-1)
    with pytest.raises(ValueError, match="depth_ensemble must be one of"):
        EvalSpec(depth_ensemble="scipy")
    with pytest.raises(ValueError, match="align_downsample"):
        EvalSpec(align_downsample="bilinear")
    assert (EvalSpec().depth_ensemble, EvalSpec().align_downsample) == ("diffusers", "upstream_width")
    with pytest.raises(ValueError, match="for normals models"):
        GeometryEstimator(tiny=TinySpec(seed=0), evaluation=EvalSpec(dataset="ibims", task="normals"))


# dataset -> (task, shards). The protocol values themselves live in configs/eval/*.yaml only; the test below checks
# them against what the converters write (check_protocol), the converter tests pin the converters' constants.
PROTOCOLS = {
    "nyuv2": ("depth", "nyuv2/test-*.tar"),
    "kitti": ("depth", "kitti/test-*.tar"),
    "eth3d": ("depth", "eth3d/test-*.tar"),
    "scannet": ("depth", "scannet/test-*.tar"),
    "diode": ("depth", "diode/val-*.tar"),
    "nyuv2_normals": ("normals", "nyuv2_normals/test-*.tar"),
    "scannet_normals": ("normals", "scannet_normals/test-*.tar"),
    "ibims": ("normals", "ibims/test-*.tar"),
    "sintel": ("normals", "sintel/test-*.tar"),
}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_eval_configs_are_complete(name):
    config = yaml.safe_load((ROOT / f"configs/eval/{name}.yaml").read_text())
    spec = EvalSpec(**config["model"]["init_args"]["evaluation"])
    task, shards = PROTOCOLS[name]
    assert (spec.dataset, spec.task) == (name, task)
    assert spec.input_mode == ("dsine_minmax" if task == "normals" else "exact")
    assert spec.align_downsample == "upstream_width" and spec.depth_ensemble in DEPTH_ENSEMBLE_PRESETS
    if task == "depth":  # pinned in the file, not left to the defaults
        evaluation = config["model"]["init_args"]["evaluation"]
        assert evaluation["depth_ensemble"] == "diffusers"
        assert {"min_depth", "max_depth", "processing_resolution"} <= set(evaluation)
    data = config["data"]["init_args"]
    assert data["test_shards"] == shards and data["shard_root"] == "data/shards"
    assert config["trainer"]["logger"]["init_args"]["name"] == f"eval/{name}"
    ShardDataModule(**data)  # the data section is valid as written


def converter_metadata(name: str) -> dict:
    """The eval_* metadata (plus height, width) the converters write for `name`, built from their constants."""
    if name in marigold_eval.PROTOCOLS:
        protocol = marigold_eval.PROTOCOLS[name]
        low, high = protocol.clip_only or (protocol.min_depth, protocol.max_depth)
        crops = {"nyuv2": ((480, 640), list(marigold_eval.NYU_EIGEN_CROP)),
                 "kitti": ((352, 1216), list(marigold_eval.eigen_crop_box(352, 1216)))}  # fmt: skip
        (height, width), crop = crops.get(name, ((480, 640), None))
        return dict(
            eval_protocol="marigold_depth", eval_min_depth=low, eval_max_depth=high, eval_crop=crop,
            eval_mask="file" if protocol.clip_only else "range+eigen_crop" if crop else "range",
            eval_processing_resolution=protocol.processing_resolution, eval_alignment="least_squares",
            eval_alignment_max_res=protocol.alignment_max_res, height=height, width=width,
        )  # fmt: skip
    if name == "middlebury":
        return dict(
            eval_protocol="marigold_depth", eval_min_depth=middlebury.MIN_DEPTH, eval_max_depth=middlebury.MAX_DEPTH,
            eval_mask="range", eval_crop=None, eval_processing_resolution=middlebury.PROCESSING_RESOLUTION,
            eval_alignment="least_squares", eval_alignment_max_res=None, height=500, width=741,
        )  # fmt: skip
    return dict(
        eval_protocol="dsine_normals", eval_mask="norm>0.5", eval_processing_resolution=0, eval_alignment="none"
    )


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "configs/eval").glob("*.yaml")))
def test_eval_configs_agree_with_the_converters(name):
    config = yaml.safe_load((ROOT / f"configs/eval/{name}.yaml").read_text())
    assert check_protocol(config["model"]["init_args"]["evaluation"], converter_metadata(name)) == []


def test_check_protocol_reports_each_mismatch():
    eth3d = converter_metadata("eth3d")
    good = dict(dataset="eth3d", task="depth", processing_resolution=756, align_max_res=1024, min_depth=1e-5,
                max_depth=math.inf)  # fmt: skip
    assert check_protocol(EvalSpec(**good), eth3d) == check_protocol(good, eth3d) == []
    bad = {**good, "task": "normals", "processing_resolution": 768, "align_max_res": None, "max_depth": 80.0}
    problems = check_protocol(bad, eth3d)
    assert [p.split(":")[0] for p in problems] == ["task", "processing_resolution", "align_max_res", "max_depth"]
    assert "spec 768, shards 756" in problems[1]
    assert check_protocol(good, {**eth3d, "eval_alignment": "none"})[0].startswith("alignment:")
    assert check_protocol(good, {"source": "hypersim"})[0].startswith("eval_protocol:")


def test_check_protocol_crop_and_clip_only_ranges():
    nyu = converter_metadata("nyuv2")
    spec = dict(dataset="nyuv2", min_depth=1e-3, max_depth=10.0, crop=[0.09375, 0.98125, 0.0640625, 0.9390625])
    assert check_protocol(spec, nyu) == []
    assert check_protocol({**spec, "crop": [0.1, 0.98125, 0.0640625, 0.9390625]}, nyu) == [
        "crop: spec box [48, 471, 41, 601], shards [45, 471, 41, 601]"
    ]
    assert check_protocol(spec, {**nyu, "eval_crop": None})[0].startswith("crop:")
    assert check_protocol({**spec, "crop": None}, nyu) == []  # the shards' mask already holds the crop
    diode = converter_metadata("diode")
    clip_only = dict(dataset="diode", processing_resolution=640, min_depth=0.6, max_depth=350.0)
    assert check_protocol({**clip_only, "mask_gt_range": False}, diode) == []
    assert check_protocol(clip_only, diode)[0].startswith("mask_gt_range:")


def test_cli_test_stops_when_the_protocol_disagrees_with_the_shards(tmp_path, shard_cache, capsys):
    """`test` reads the shards' eval_* metadata and refuses a protocol they were not converted for."""
    from experiments.__main__ import main
    from tests.helpers import tiny_run_args

    meta = dict(source="t", eval_protocol="marigold_depth", eval_min_depth=1e-3, eval_max_depth=10.0,
                eval_mask="range", eval_crop=None, eval_processing_resolution=0, eval_alignment="least_squares",
                eval_alignment_max_res=None)  # fmt: skip
    with ShardWriter(tmp_path / "set", "test", 4) as writer:
        for index in range(2):
            sample, _ = depth_sample(index, 24, 32)
            sample["json"] = json.dumps(meta).encode()
            writer.write(sample)
    args = [
        *tiny_run_args(tmp_path, "e2e_depth_tiny", shard_cache),
        f"--data.init_args.test_shards={tmp_path}/set/test-*.tar",
    ]
    with pytest.raises(SystemExit, match="does not match the test shards"):
        main(["test", *args, "--model.init_args.evaluation.max_depth=80"])
    tested = main(["test", *args, "--model.init_args.evaluation.max_depth=80", "--allow_protocol_mismatch=true"])
    assert tested.trainer.callback_metrics["test/images"] == 2
    assert "max_depth: spec 80.0, shards 10.0" in capsys.readouterr().out
    agreed = main(["test", *args, "--model.init_args.evaluation.max_depth=10"])
    assert agreed.trainer.callback_metrics["test/images"] == 2
