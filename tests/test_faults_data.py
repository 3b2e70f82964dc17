"""Fault injection for the data and the run folders (issue 12): real shards, written with the project's
ShardWriter and encode_sample, then damaged; checkpoints written with torch.save, then cut short.

Each test's docstring ends with what the fault did before the fix (run once against the previous code):
silent (nothing said, data lost or used wrongly), traceback (the run stopped), or clear (a counted warning).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.datamodule import ShardDataModule
from datamodules.shard_format import SampleFormatError, decode_sample, encode_sample, expected_samples, tar_damage
from datamodules.shard_writer import ShardWriter
from datamodules.streams import PAD_KEY, TrainStream, ValidationStream
from datamodules.synthetic import generate_synthetic_shards
from datamodules.targets import SKIP_REASONS, skip_totals
from experiments import demo
from experiments.run_dir import check_fresh_run_folder, checkpoint_problem, move_aside, resolve_ckpt_path
from tests.helpers import ROOT

PER_SHARD = 4


# ------------------------------------------------------------------------------------------ shards and damage
def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(index: int, meta: dict | None = None, size: tuple[int, int] = (8, 8), **members: bytes | None) -> dict:
    """A distinct sample `s<index>`; `meta` entries are written into its json as given (NaN included), members
    replaced (None removes one)."""
    h, w = size
    depth = np.linspace(1.0, 2.0, h * w, dtype=np.float32).reshape(h, w) + index
    encoded = encode_sample(f"s{index}", np.full((h, w, 3), index, np.uint8), depth, np.ones((h, w), bool),
                            meta={"source": "t"})  # fmt: skip
    if meta:
        encoded["json"] = json.dumps({**json.loads(encoded["json"]), **meta}).encode()
    for name, data in members.items():
        name = name.replace("_", ".")
        if data is None:
            del encoded[name]
        else:
            encoded[name] = data
    return encoded


def write_shards(folder: Path, count: int = 8, bad: dict | None = None, manifest: bool = True, prefix="val") -> list:
    """`count` samples in shards of PER_SHARD; `bad` maps an index to a replacement sample. With `manifest`, the
    manifest.json ShardWriter writes (the converters' format: shards, samples_per_shard)."""
    with ShardWriter(folder, prefix, PER_SHARD, manifest=manifest) as writer:
        for index in range(count):
            writer.write((bad or {}).get(index) or sample(index))
    shards = [str(path) for path in writer.written]
    if manifest:
        counts = [min(PER_SHARD, count - k * PER_SHARD) for k in range(len(shards))]
        assert [expected_samples(s) for s in shards] == counts
    return shards


def member_offsets(shard: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return {member.name: member for member in tar.getmembers()}


def cut(shard: str, at: int) -> None:
    """Truncate the file at byte `at`, as an interrupted copy or a full disk leaves it."""
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[:at])


def overwrite(shard: str, at: int, length: int) -> None:
    """Overwrite `length` bytes at `at` with garbage, the file keeping its size (bit rot, a bad copy)."""
    data = bytearray(Path(shard).read_bytes())
    data[at : at + length] = (b"garbage!" * (length // 8 + 1))[:length]
    Path(shard).write_bytes(bytes(data))


def validate(shards: list[str], workers: int = 0, batch_size: int = 2) -> tuple[list[str], dict[str, int]]:
    """One validation pass through a DataLoader: real keys read, skip counts as they arrived in the batches."""
    stream = ValidationStream(shards, batch_size=batch_size)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    keys, skipped = [], torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for batch in loader:
        assert batch["skipped"].shape == (len(batch["key"]), len(SKIP_REASONS))
        assert batch["skipped"].dtype == torch.long
        keys += [key for key in batch["key"] if key != PAD_KEY]
        skipped += batch["skipped"].sum(0)
    return keys, skip_totals(skipped)


def train(shards: list[str], batches: int = 12, workers: int = 0) -> tuple[set[str], dict[str, int]]:
    stream = TrainStream(shards, batch_size=2, shuffle_buffer=1, hflip_prob=0.0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    keys, skipped = set(), torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for index, batch in enumerate(loader):
        keys |= set(batch["key"])
        skipped += batch["skipped"].sum(0)
        if index + 1 == batches:
            break
    return keys, skip_totals(skipped)


def all_keys(count: int = 8, without: tuple[int, ...] = ()) -> list[str]:
    return [f"s{i}" for i in range(count) if i not in without]


# ------------------------------------------------------------------------------------------ truncated shards
def test_truncated_shard_counts_every_lost_sample_from_the_manifest(tmp_path, caplog):
    """Shard 2 of 2 cut in the middle of s6: s6 and s7 are lost, counted 2 from manifest.json.

    Before: clear but wrong count: one "missing members" warning for s6, s7 lost silently; skipped = 1.
    """
    shards = write_shards(tmp_path)
    cut(shards[1], member_offsets(shards[1])["s6.mask.png"].offset_data + 10)
    with caplog.at_level(logging.WARNING):
        keys, skipped = validate(shards)
    assert keys == all_keys(without=(6, 7))
    assert skipped == {"truncated_shard": 2}
    assert "2 samples of shard" in caplog.text and "val-000001.tar [truncated_shard]" in caplog.text
    assert "after 2 of its 4 samples (manifest.json)" in caplog.text and "partial last sample 's6'" in caplog.text


def test_truncated_shard_without_a_manifest_counts_at_least_one(tmp_path, caplog):
    """Before: one "missing members" warning for s6, s7 lost without a word."""
    shards = write_shards(tmp_path, manifest=False)
    cut(shards[1], member_offsets(shards[1])["s6.mask.png"].offset_data + 10)
    with caplog.at_level(logging.WARNING):
        keys, skipped = validate(shards)
    assert keys == all_keys(without=(6, 7)) and skipped == {"truncated_shard": 1}
    assert "at least 1 sample of shard" in caplog.text and "no manifest.json gives the shard's count" in caplog.text


@pytest.mark.parametrize("manifest, lost", [(True, 2), (False, 1)])
def test_shard_cut_at_a_sample_boundary_is_found(tmp_path, caplog, manifest, lost):
    """Cut exactly before s6: a stream reader sees a normal end (no error), so only the missing end-of-archive
    marker tells. s5, the last sample before the cut, is whole and kept.

    Before: silent (s6 and s7 lost, nothing counted or logged).
    """
    shards = write_shards(tmp_path, manifest=manifest)
    cut(shards[1], member_offsets(shards[1])["s6.depth.png"].offset)
    assert "end-of-archive marker" in tar_damage(shards[1]) and tar_damage(shards[0]) is None
    with caplog.at_level(logging.WARNING):
        keys, skipped = validate(shards)
    assert keys == all_keys(without=(6, 7)) and skipped == {"truncated_shard": lost}
    assert "end-of-archive marker" in caplog.text


def test_garbage_over_a_header_in_the_middle_is_found(tmp_path, caplog):
    """Garbage over s6's first tar header: tarfile stops there as if the archive ended.

    Before: silent (s6 and s7 lost, nothing counted or logged).
    """
    shards = write_shards(tmp_path)
    overwrite(shards[1], member_offsets(shards[1])["s6.depth.png"].offset, 512)
    with caplog.at_level(logging.WARNING):
        keys, skipped = validate(shards)
    assert keys == all_keys(without=(6, 7)) and skipped == {"truncated_shard": 2}
    assert "unreadable tar header" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "empty", "deleted", "first header"])
def test_unreadable_shards_count_the_samples_their_manifest_lists(tmp_path, caplog, damage):
    """Before: clear (one warning, skipped = 1), but a shard of 4 samples counted as 1."""
    shards = write_shards(tmp_path)
    if damage == "garbage":
        Path(shards[1]).write_bytes(b"not a tar file" * 100)
    elif damage == "empty":
        Path(shards[1]).write_bytes(b"")
    elif damage == "deleted":
        Path(shards[1]).unlink()
    else:
        overwrite(shards[1], 0, 512)
    with caplog.at_level(logging.WARNING):
        keys, skipped = validate(shards)
    assert keys == all_keys(without=(4, 5, 6, 7)) and skipped == {"unreadable_shard": 4}
    assert "val-000001.tar [unreadable_shard, 4 samples per manifest.json]" in caplog.text


def test_training_stream_counts_truncated_and_unreadable_shards(tmp_path, caplog):
    """Before: clear for the unreadable shard; the truncated one lost its later samples without a count."""
    shards = write_shards(tmp_path, count=12, prefix="train")
    cut(shards[1], member_offsets(shards[1])["s6.mask.png"].offset_data + 10)
    Path(shards[2]).write_bytes(b"garbage" * 100)
    with caplog.at_level(logging.WARNING):
        keys, skipped = train(shards, batches=20)
    assert keys == set(all_keys(without=(6, 7, 8, 9, 10, 11)))
    # Resampled shards are read again and again: each read loses (and counts) their samples again.
    assert set(skipped) == {"truncated_shard", "unreadable_shard"}
    assert skipped["truncated_shard"] % 2 == 0 and skipped["unreadable_shard"] % 4 == 0
    # Warned once per shard and reason; the repeats go to DEBUG.
    assert caplog.text.count("[truncated_shard]") == 1 and caplog.text.count("[unreadable_shard") == 1


# ------------------------------------------------------------------------------------------ bad samples
def with_meta(**meta) -> dict:
    return {2: sample(2, meta=meta)}


BAD_SAMPLES = {
    # name: (replacement for s2, reason, words in the warning, what happened before the fix)
    "NaN depth_scale": (with_meta(depth_scale=float("nan")), "bad_metadata", "depth_scale nan", "silent: empty mask"),
    "zero depth_scale": (with_meta(depth_scale=0.0), "bad_metadata", "depth_scale 0.0", "silent: empty mask"),
    "negative depth_scale": (with_meta(depth_scale=-0.001), "bad_metadata", "depth_scale -0.001", "silent"),
    "text depth_scale": (with_meta(depth_scale="mm"), "bad_metadata", "depth_scale 'mm'", "traceback"),
    "text min_depth": (with_meta(min_depth="near"), "bad_metadata", "min_depth 'near'", "traceback"),
    "NaN max_depth": (with_meta(max_depth=float("nan")), "bad_metadata", "max_depth nan", "silent: no range"),
    "min >= max depth": (with_meta(min_depth=5.0, max_depth=1.0), "bad_metadata", "not below", "silent: empty"),
    "text has_depth": (with_meta(has_depth="no"), "bad_metadata", "has_depth 'no'", "silent: read as true"),
    "json not JSON": ({2: sample(2, json=b"{not json")}, "bad_metadata", "unreadable json", "clear"),
    "8-bit depth PNG": (
        {2: sample(2, depth_png=png(np.full((8, 8), 200, np.uint8)))}, "bad_image", "(an 8-bit PNG)", "clear",
    ),
    "garbage rgb.png": ({2: sample(2, rgb_png=b"\x89PNG garbage" * 10)}, "bad_image", "cannot decode rgb.png", "clear"),
    "RGB mask.png": ({2: sample(2, mask_png=png(np.full((8, 8, 3), 255, np.uint8)))}, "bad_image", "grayscale", "clear"),
    "mask of another size": (
        {2: sample(2, mask_png=png(np.full((8, 16), 255, np.uint8)))}, "size_mismatch", "differ in size", "clear",
    ),
    "normals of another size": (
        {2: sample(2, normals_png=png(np.zeros((8, 16, 3), np.uint8)))}, "size_mismatch", "normals.png", "clear",
    ),
    "no depth.png": ({2: sample(2, depth_png=None)}, "missing_member", "missing members ['depth.png']", "clear"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_SAMPLES))
def test_a_bad_sample_is_a_counted_skip_with_its_key_and_reason(tmp_path, caplog, name):
    """Every bad sample: skipped in validation and training, counted under its reason, warned with key and reason.

    Before: see the last entry of BAD_SAMPLES (silent ones trained or scored on an empty or wrong sample).
    """
    bad, reason, words, _before = BAD_SAMPLES[name]
    shards = write_shards(tmp_path / "val", bad=bad)
    with caplog.at_level(logging.WARNING):
        keys, skipped = validate(shards)
    assert keys == all_keys(without=(2,)) and skipped == {reason: 1}
    assert f"a sample [{reason}]: s2 in {shards[0]}" in caplog.text and words in caplog.text
    keys, skipped = train(write_shards(tmp_path / "train", bad=bad, prefix="train"), batches=8)
    assert keys == set(all_keys(without=(2,))) and set(skipped) == {reason}


def test_a_training_image_that_is_not_a_multiple_of_8_is_skipped(tmp_path, caplog):
    """Before: traceback (ValueError from build_targets ended the training)."""
    odd = encode_sample("s2", np.zeros((6, 10, 3), np.uint8), np.ones((6, 10), np.float32), np.ones((6, 10), bool))
    with caplog.at_level(logging.WARNING):
        keys, skipped = train(write_shards(tmp_path, bad={2: odd}, prefix="train"), batches=8)
    assert keys == set(all_keys(without=(2,))) and set(skipped) == {"bad_size"}
    assert "a sample [bad_size]: s2: image size 6x10 is not a multiple of 8" in caplog.text


def test_the_encoder_refuses_an_unusable_depth_scale():
    """Before: silent (NaN divided the depth: every pixel stored as garbage)."""
    with pytest.raises(SampleFormatError, match="depth_scale nan is not a positive finite number") as caught:
        encode_sample("k", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), np.ones((8, 8), bool),
                      meta={"depth_scale": float("nan")})  # fmt: skip
    assert caught.value.reason == "bad_metadata"
    assert decode_sample(sample(0, meta={"min_depth": None}))["meta"]["min_depth"] is None  # null = absent


# ------------------------------------------------------------------------------------------ counts reach the main process
def test_counts_reach_the_main_process_from_workers_and_ranks_once(tmp_path, monkeypatch):
    """Each shard's skips are counted once, by the one rank and worker that reads it.

    Before: the counts stayed in the workers (the main process's `stream.skipped` was 0 with num_workers=2) and
    every worker logged the same bad shard.
    """
    shards = write_shards(tmp_path, count=12, bad={1: sample(1, rgb_png=b"junk"), 9: sample(9, json=b"[")})
    cut(shards[1], member_offsets(shards[1])["s6.mask.png"].offset_data + 10)
    expected = {"truncated_shard": 2, "bad_image": 1, "bad_metadata": 1}
    keys, skipped = validate(shards, workers=2)
    assert sorted(keys) == sorted(all_keys(12, without=(1, 6, 7, 9))) and skipped == expected
    total = {}
    for rank in range(2):  # two DDP ranks with two workers each
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys, skipped = validate(shards, workers=2, batch_size=3)
        assert len(keys) == len(set(keys))
        total = {reason: total.get(reason, 0) + skipped.get(reason, 0) for reason in {*total, *skipped}}
    assert total == expected


def test_training_counts_reach_the_main_process_from_workers(tmp_path):
    shards = write_shards(tmp_path, count=16, prefix="train", bad={1: sample(1, json=b"[")})
    Path(shards[3]).write_bytes(b"")
    keys, skipped = train(shards, batches=24, workers=2)
    assert set(skipped) == {"bad_metadata", "unreadable_shard"} and "s1" not in keys


class Probe(LightningModule):
    """A model that only receives batches."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def validation_step(self, batch, batch_idx):
        return None

    def test_step(self, batch, batch_idx):
        return None


@pytest.mark.parametrize("workers", [0, 2])
def test_the_datamodule_totals_skips_at_the_end_of_a_command(tmp_path, caplog, workers):
    """Before: no total anywhere; the main process never saw the workers' counts."""
    shards = write_shards(tmp_path / "val", bad={2: sample(2, depth_png=b"junk")})
    cut(shards[1], member_offsets(shards[1])["s6.mask.png"].offset_data + 10)
    data = ShardDataModule(val_shards=str(tmp_path / "val/*.tar"), num_workers=workers, val_batch_size=2)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="datamodules.datamodule"):
        trainer.validate(Probe(), datamodule=data)
        trainer.test(Probe(), datamodule=data)
    lines = [r.getMessage() for r in caplog.records if r.name == "datamodules.datamodule"]
    assert "validation read 5 samples, skipped 3: 2 truncated_shard, 1 bad_image" in lines
    assert "test read 5 samples, skipped 3: 2 truncated_shard, 1 bad_image" in lines
    assert all(r.levelno == logging.WARNING for r in caplog.records if "skipped 3" in r.getMessage())


def test_totals_leave_out_the_sanity_check_and_padding():
    data = ShardDataModule(val_shards="unused/*.tar")
    batch = {"key": ["a", PAD_KEY], "skipped": torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0], [0, 2, 0, 0, 0, 0, 0, 0]])}
    for stage in ("sanity_check", "validate", "validate"):
        data.trainer = SimpleNamespace(state=SimpleNamespace(stage=SimpleNamespace(value=stage)))
        data.on_before_batch_transfer(batch, 0)
    assert data.skip_report() == ["validation read 2 samples, skipped 6: 6 truncated_shard"]


# ------------------------------------------------------------------------------------------ missing shards
def test_missing_evaluation_shards_name_the_pattern_and_the_conversion(tmp_path):
    """Before: clear ("no shard file matches '<path>'"), without the conversion command."""
    data = ShardDataModule(shard_root=str(tmp_path / "shards"), test_shards="nyuv2/test-*.tar")
    with pytest.raises(FileNotFoundError) as caught:
        data.check_shards("test")
    message = str(caught.value)
    assert f"{tmp_path}/shards/nyuv2/test-*.tar" in message
    assert f"python -m datamodules.convert nyuv2 --src <raw nyuv2 folder> --out {tmp_path}/shards/nyuv2" in message
    with pytest.raises(FileNotFoundError, match="python -m datamodules.convert nyuv2"):
        data.test_dataloader()  # the same message where the shards are first listed
    part = ShardDataModule(shard_root=str(tmp_path), val_shards="hypersim_val/val-*.tar")
    with pytest.raises(FileNotFoundError, match="a part of 'hypersim'"):
        part.check_shards("fit")
    write_shards(tmp_path / "shards/nyuv2", prefix="test")
    data.check_shards("test")
    data.check_shards("predict")
    ShardDataModule(synthetic=None, val_shards=str(tmp_path / "shards/nyuv2/*.tar")).check_shards("fit")


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, step: int, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.arange(1000.0)}}, path)
    os.utime(path, (path.stat().st_mtime - age, path.stat().st_mtime - age))
    return path


def test_auto_resume_skips_a_truncated_newest_checkpoint(tmp_path, caplog):
    """Before: traceback (Lightning's "PytorchStreamReader failed reading zip archive" on the cut last.ckpt)."""
    hpc = save_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 3, age=30)
    periodic = save_checkpoint(tmp_path / "checkpoints/epoch=0-step=4.ckpt", 4, age=20)
    last = save_checkpoint(tmp_path / "checkpoints/last.ckpt", 4, age=10)
    cut(str(last), last.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        assert resolve_ckpt_path("auto", str(tmp_path)) == str(hpc)  # the newest hpc/last checkpoint that loads
    assert f"skipped {last}: not a complete torch archive" in caplog.text
    assert f"resuming from {hpc}, the newest whole checkpoint" in caplog.text
    Path(hpc).write_bytes(b"")
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(periodic)  # then the periodic ones
    cut(str(periodic), 100)
    with pytest.raises(FileNotFoundError, match="no checkpoint under .* is whole"):
        resolve_ckpt_path("auto", str(tmp_path))
    assert torch.load(save_checkpoint(tmp_path / "ok.ckpt", 1, 0), weights_only=False)["global_step"] == 1
    assert checkpoint_problem(tmp_path / "ok.ckpt") is None
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"a": 1}, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint_problem(legacy) is None  # the legacy format cannot be checked cheaply: passes


# ------------------------------------------------------------------------------------------ run folders
def run_logger(tmp_path: Path, version) -> SimpleNamespace:
    logger = TensorBoardLogger(save_dir=str(tmp_path / "runs"), name="exp", version=version)
    return SimpleNamespace(logger=logger, default_root_dir=str(tmp_path / "runs/exp" / str(version)))


def test_a_second_fit_into_a_folder_with_checkpoints_is_refused(tmp_path):
    """Before: silent mix: the second run's events joined the first's, its last checkpoint became last-v1.ckpt
    and last.ckpt kept naming the first run."""
    trainer = run_logger(tmp_path, "v")
    check_fresh_run_folder(trainer, None, env={})  # a new folder
    last = save_checkpoint(tmp_path / "runs/exp/v/checkpoints/last.ckpt", 2, 0)
    with pytest.raises(FileExistsError) as caught:
        check_fresh_run_folder(trainer, None, env={})
    message = str(caught.value)
    assert f"{tmp_path}/runs/exp/v already holds a run (1 checkpoint file: checkpoints/last.ckpt)" in message
    assert "--ckpt_path auto" in message and "--trainer.logger.init_args.version=<new>" in message
    with pytest.raises(FileExistsError):  # fine-tuning from another run's checkpoint into this folder
        check_fresh_run_folder(trainer, str(save_checkpoint(tmp_path / "other.ckpt", 1, 0)), env={})
    check_fresh_run_folder(trainer, "auto", env={})  # resume
    check_fresh_run_folder(trainer, str(last), env={})  # an explicit resume of this run
    check_fresh_run_folder(run_logger(tmp_path, None), None, env={})  # Lightning picks a new version_N


def test_a_requeued_slurm_job_resumes_in_its_folder(tmp_path):
    """Lightning's own requeue rule (no ckpt_path, under srun, an hpc checkpoint in the root dir) stays allowed."""
    trainer = run_logger(tmp_path, "job_4242")
    save_checkpoint(tmp_path / "runs/exp/job_4242/checkpoints/last.ckpt", 2, 10)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "dgft", "SLURM_JOB_ID": "4242"}
    with pytest.raises(FileExistsError):  # requeued after a node failure: no hpc checkpoint, no --ckpt_path auto
        check_fresh_run_folder(trainer, None, env=slurm)
    save_checkpoint(tmp_path / "runs/exp/job_4242/hpc_ckpt_1.ckpt", 3, 0)
    check_fresh_run_folder(trainer, None, env=slurm)
    with pytest.raises(FileExistsError):  # the same folder outside SLURM: Lightning would not resume
        check_fresh_run_folder(trainer, None, env={})
    check_fresh_run_folder(trainer, "auto", env=slurm)  # slurm/train.sbatch passes --ckpt_path auto


def test_a_fixed_version_cli_fit_twice_is_refused_on_the_real_logger(tmp_path):
    """The check on the trainer the CLI builds (the lead wires it into before_fit)."""
    from experiments.__main__ import main

    args = [
        "--config", str(ROOT / "configs/trainer/cpu.yaml"), "--config", str(ROOT / "configs/model/e2e_depth_tiny.yaml"),
        "--config", str(ROOT / "tests/configs/tiny_data.yaml"), f"--data.init_args.synthetic.cache_dir={tmp_path}/c",
        f"--trainer.logger.init_args.save_dir={tmp_path}/runs", "--trainer.logger.init_args.name=twice",
        "--trainer.logger.init_args.version=v", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    first = main(["fit", *args])
    assert Path(first.trainer.checkpoint_callback.last_model_path) == tmp_path / "runs/twice/v/checkpoints/last.ckpt"
    again = main(args, run=False)
    with pytest.raises(FileExistsError, match="runs/twice/v already holds a run"):
        check_fresh_run_folder(again.trainer, None, env={})
    check_fresh_run_folder(again.trainer, "auto", env={})


def test_move_aside_keeps_an_earlier_folder(tmp_path):
    folder = tmp_path / "demo_e2e"
    assert move_aside(folder) is None  # nothing there
    (folder / "fit").mkdir(parents=True)
    (folder / "fit/events").write_text("x")
    first = move_aside(folder, now=0)
    (folder / "fit").mkdir(parents=True)
    (folder / "fit/events").write_text("y")
    second = move_aside(folder, now=0)  # the same second: a counter keeps both
    assert not folder.exists() and first != second
    assert first.name.startswith("demo_e2e.old-") and (first / "fit/events").read_text() == "x"
    assert (second / "fit/events").read_text() == "y"


def test_the_demo_moves_an_earlier_demo_aside_before_it_starts(tmp_path, monkeypatch, capsys):
    """Before: silent mix: the second demo logged into runs/demo_e2e/{before,fit,after} next to the first one's
    events, and its checkpoint became last-v1.ckpt (README and `validate --ckpt_path .../last.ckpt` then name the
    first demo's weights)."""
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "runs/demo_e2e/fit/checkpoints/last.ckpt"
    old.parent.mkdir(parents=True)
    old.write_text("first demo")
    calls = []

    def fake_main(args):  # records the three runs; --print_config goes to the real CLI's parser
        if "--print_config" in args:
            from experiments.__main__ import main

            return main(args)
        calls.append(args)
        assert not (tmp_path / "runs/demo_e2e").exists()  # moved before the first run
        trainer = SimpleNamespace(callback_metrics={"val/abs_rel": torch.tensor(0.5)}, global_step=3,
                                  checkpoint_callback=SimpleNamespace(last_model_path="x.ckpt"),
                                  logger=SimpleNamespace(save_dir="runs"))  # fmt: skip
        return SimpleNamespace(trainer=trainer)

    monkeypatch.setattr(demo, "main", fake_main)
    monkeypatch.setattr(demo, "uses_standin", lambda config, overrides: False)
    demo.run_demo(str(ROOT / "configs/demo.yaml"), [])
    assert [a[0] for a in calls] == ["validate", "fit", "validate"]
    (aside,) = (tmp_path / "runs").glob("demo_e2e.old-*")
    assert (aside / "fit/checkpoints/last.ckpt").read_text() == "first demo"
    assert f"runs/demo_e2e holds an earlier demo: moved it to {Path('runs') / aside.name}" in capsys.readouterr().out


def test_the_synthetic_and_converter_manifests_give_per_shard_counts(tmp_path):
    shards = generate_synthetic_shards(tmp_path / "syn", 6, 16, 16, seed=0, samples_per_shard=4, split_name="val")
    assert [expected_samples(s) for s in shards] == [4, 2]
    cut(str(shards[1]), member_offsets(str(shards[1]))["synthetic-val-000005.depth.png"].offset)
    keys, skipped = validate([str(s) for s in shards])
    assert len(keys) == 5 and skipped == {"truncated_shard": 1}
    converted = write_shards(tmp_path / "conv", count=6)
    manifest = json.loads((tmp_path / "conv/manifest.json").read_text())
    manifest["samples_per_shard"][1] = None  # a shard without a record (runner.py: shards_without_record)
    (tmp_path / "conv/manifest.json").write_text(json.dumps(manifest))
    assert [expected_samples(s) for s in converted] == [4, None]
    assert expected_samples(tmp_path / "elsewhere/val-000000.tar") is None
