"""Fault injection for `infer`, `export` and model loading (issue 12): every bad input ends in a clear message or
a counted skip, never a traceback, and nothing already written is lost or left truncated.

Each test runs the command's `main(argv)` in-process on tiny models and checks the exit status, the message and
the files on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import lightning
import numpy as np
import pytest
import torch
import yaml
from diffusers import MarigoldNormalsPipeline, UNet2DConditionModel
from PIL import Image

import experiments.infer as infer
from experiments.export import main as export_main
from lightning_modules.image_io import write_depth
from lightning_modules.module import GeometryEstimator
from lightning_modules.tasks import build_task
from lightning_modules.tiny import TinySpec
from tests.helpers import ROOT, export_model

NAMES = ("a", "b", "c")  # images in the input folder, predicted in this order
# the one-at-a-time path, and batches read ahead by workers (the pipeline of experiments/infer_pipeline.py)
PIPELINES = pytest.mark.parametrize(
    "pipeline", [["--workers", "0"], ["--batch_size", "2", "--workers", "2"]], ids=["one_at_a_time", "batched"]
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def perturbed(task: str = "depth", seed: int = 3) -> GeometryEstimator:
    model = GeometryEstimator(tiny=TinySpec(seed=0), task=task).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.core.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def save_checkpoint(model: GeometryEstimator, path: Path, hparams: bool = True) -> Path:
    """Shaped like a Lightning checkpoint: no frozen VAE weights, (optionally) the module's hyperparameters."""
    content = {"state_dict": {k: v for k, v in model.state_dict().items() if not k.startswith("core.vae.")}}
    if hparams:
        content |= {"hyper_parameters": dict(model.hparams), "pytorch-lightning_version": lightning.__version__}
    torch.save(content, path)
    return path


@pytest.fixture(scope="module")
def depth_model() -> GeometryEstimator:
    return perturbed()


@pytest.fixture(scope="module")
def normals_model() -> GeometryEstimator:
    return perturbed("normals")


@pytest.fixture(scope="module")
def depth_ckpt(depth_model: GeometryEstimator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(depth_model, tmp_path_factory.mktemp("ckpt") / "depth.ckpt")


@pytest.fixture(scope="module")
def normals_ckpt(normals_model: GeometryEstimator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(normals_model, tmp_path_factory.mktemp("ckpt") / "normals.ckpt")


def make_images(folder: Path, size: tuple[int, int] = (40, 56)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in NAMES:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images")


def infer_main(model: Path, input_path: Path, output: Path, *extra: str | Path) -> int:
    args = ["--model", model, "--input", input_path, "--output", output, "--processing_resolution", 32, *extra]
    return infer.main([str(a) for a in args])


def files_of(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def assert_all_complete(folder: Path) -> None:
    """Every file under a final name loads completely, and no temporary file is left behind."""
    for path in folder.rglob("*"):
        assert not path.name.startswith("."), f"temporary file left behind: {path}"
        if path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()


def assert_no_traceback(captured: pytest.CaptureResult[str]) -> None:
    assert "Traceback" not in captured.out + captured.err


# ------------------------------------------------------------------------------ 1. atomic writes
@PIPELINES
def test_interrupt_inside_a_write_leaves_no_truncated_file(
    depth_ckpt: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, pipeline: list[str]
) -> None:
    out = tmp_path / "out"
    save = Image.Image.save

    def interrupted_save(self: Image.Image, fp, *args, **kwargs):  # Ctrl-C halfway through b's colored PNG
        if fp is not None and getattr(fp, "name", "").find("b_depth_colored") >= 0:
            fp.write(b"\x89PNG\r\n\x1a\n half a file")
            raise KeyboardInterrupt
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    assert infer_main(depth_ckpt, images, out, *pipeline) == 130
    captured = capsys.readouterr()
    assert_no_traceback(captured)
    # a is complete; b's npy and 16-bit PNG were finished before the interrupt, its colored PNG never appeared
    expected = ["a_depth.npy", "a_depth_16bit.png", "a_depth_colored.png", "b_depth.npy", "b_depth_16bit.png"]
    c_files = ["c_depth.npy", "c_depth_16bit.png", "c_depth_colored.png"]
    if "0" in pipeline:  # one writer thread: c, queued behind b, is dropped
        assert files_of(out) == expected
    else:  # two writer threads: c may have been written while b was, whole; else not at all
        assert files_of(out) in (expected, expected + c_files)
    whole = 1 + (c_files[0] in files_of(out))
    assert f"interrupted: wrote {whole} of 3 images to {out}" in captured.err
    assert_all_complete(out)

    monkeypatch.undo()
    assert infer_main(depth_ckpt, images, out, *pipeline) == 0  # the rerun finishes b (and c), and leaves a alone
    assert f"wrote {3 - whole} of 3 images" in capsys.readouterr().out
    assert len(files_of(out)) == 9
    assert_all_complete(out)


def test_a_failed_overwrite_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_depth(tmp_path / "x", torch.full((4, 4), 0.25))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_depth(tmp_path / "x", torch.full((4, 4), 0.75))
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after["x_depth_16bit.png"] == before["x_depth_16bit.png"]  # the old PNG, not half a new one
    assert after["x_depth_colored.png"] == before["x_depth_colored.png"]
    assert np.load(tmp_path / "x_depth.npy")[0, 0] == 0.75  # the npy was replaced whole before the failure
    assert sorted(after) == sorted(before)  # no temporary file left


@PIPELINES
def test_a_failed_write_is_a_counted_skip(
    depth_ckpt: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, pipeline: list[str]
) -> None:
    """Written by the background thread: the error is reported for its image, the others are written."""
    save = Image.Image.save

    def disk_full_for_b(self: Image.Image, fp, *args, **kwargs):
        if getattr(fp, "name", "").find("b_depth_16bit") >= 0:
            fp.write(b"\x89PNG")
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", disk_full_for_b)
    out = tmp_path / "out"
    assert infer_main(depth_ckpt, images, out, *pipeline) == 0
    captured = capsys.readouterr()
    assert_no_traceback(captured)
    assert "wrote 2 of 3 images" in captured.out and "skipped 1: 1 unreadable or failed" in captured.out
    assert f"{images / 'b.png'}: failed: OSError: [Errno 28] No space left on device" in captured.out
    assert f"warning: skipping {images / 'b.png'}: cannot write its outputs" in captured.err
    assert [f for f in files_of(out) if f.startswith("b")] == ["b_depth.npy"]
    assert_all_complete(out)
    monkeypatch.undo()
    assert infer_main(depth_ckpt, images, out, *pipeline) == 0
    assert "wrote 1 of 3 images" in capsys.readouterr().out and len(files_of(out)) == 9


# ------------------------------------------------------------------------------ 2. reruns
@PIPELINES
def test_rerun_skips_complete_images_and_overwrite_redoes_them(
    depth_ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture, pipeline: list[str]
) -> None:
    out = tmp_path / "out"
    assert infer_main(depth_ckpt, images, out, *pipeline) == 0
    capsys.readouterr()
    old = 10**18  # 2001: a file rewritten by a later run has a newer time whatever the clock's granularity
    for path in out.iterdir():
        os.utime(path, ns=(old, old))
    (out / "c_depth_16bit.png").unlink()  # c is incomplete now
    assert infer_main(depth_ckpt, images, out, *pipeline) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 of 3 images" in printed and "skipped 2: 2 already done (--overwrite redoes them)" in printed
    rewritten = {p.name for p in out.iterdir() if p.stat().st_mtime_ns != old}
    assert rewritten == {"c_depth.npy", "c_depth_16bit.png", "c_depth_colored.png"}

    assert infer_main(depth_ckpt, images, out, "--overwrite", *pipeline) == 0
    assert "wrote 3 of 3 images" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns != old for p in out.iterdir())


@pytest.mark.parametrize("task", ["depth", "normals"])
@pytest.mark.parametrize("with_uncertainty", [False, True])
def test_output_files_are_the_files_written(task: str, with_uncertainty: bool, tmp_path: Path) -> None:
    the_task = build_task(task)
    prediction = torch.rand(1 if task == "depth" else 3, 6, 8)
    uncertainty = torch.rand(1, 6, 8) if with_uncertainty else None
    written = the_task.write_outputs(tmp_path / "sub/x", prediction, uncertainty)
    assert written == the_task.output_files(tmp_path / "sub/x", with_uncertainty)
    assert sorted(files_of(tmp_path)) == sorted(p.relative_to(tmp_path).as_posix() for p in written)


# ------------------------------------------------------------------------------ 3. Ctrl-C
@PIPELINES
def test_ctrl_c_reports_what_was_written(
    depth_ckpt: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, pipeline: list[str]
) -> None:
    predicted = []
    real_predict = infer.predict

    def predict_then_interrupt(core, task, rgb, *args, **kwargs):  # Ctrl-C while predicting the third image
        predicted.extend([1] * len(rgb))
        if len(predicted) >= 3:
            raise KeyboardInterrupt
        return real_predict(core, task, rgb, *args, **kwargs)

    monkeypatch.setattr(infer, "predict", predict_then_interrupt)
    out = tmp_path / "out"
    # a and b may still wait in the writer's queue: they are written before the run stops
    assert infer_main(depth_ckpt, images, out, *pipeline) == 130
    captured = capsys.readouterr()
    assert_no_traceback(captured)
    assert f"interrupted: wrote 2 of 3 images to {out}" in captured.err
    assert [f for f in files_of(out) if f.startswith("c")] == []
    assert len(files_of(out)) == 6
    assert_all_complete(out)


@pytest.mark.slow  # about 15 s on 2 loaded CPU cores, most of it the subprocess's imports
def test_a_real_ctrl_c_stops_workers_writer_and_all(depth_ckpt: Path, tmp_path: Path) -> None:
    """SIGINT to the whole process group, as a terminal sends it: the main process, its reading workers."""
    many = tmp_path / "many"
    many.mkdir()
    rng = np.random.default_rng(0)
    count = 48
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(many / f"{i:02d}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "experiments.infer", "--model", str(depth_ckpt), "--input", str(many),
               "--output", str(out), "--processing_resolution", "128", "--batch_size", "2", "--workers", "2"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*_depth_colored.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr, stderr[-4000:]
    message = stderr.split("interrupted: wrote ")[1]
    written = int(message.split(" of ")[0])
    assert message.startswith(f"{written} of {count} images to {out}") and 0 < written < count
    # exactly the images counted are there, each whole (what was queued was written first), no temporary file
    complete = {f.split("_depth")[0] for f in files_of(out)}
    assert len(complete) == written and len(files_of(out)) == 3 * written
    assert_all_complete(out)


# ------------------------------------------------------------------------------ 4. options and folders
@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(infer, "load_model", refuse)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--processing_resolution", "-8"], "--processing_resolution must be >= 0 (0 = native), got -8"),
        (["--processing_resolution", "30"], "must be 0 (native) or a multiple of 8 (the VAE's downsampling factor), got 30; e.g. 24"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--ensemble", "0"], "--ensemble must be >= 1, got 0"),
        (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        (["--ensemble", "3", "--init", "zeros"], "use --init gaussian (or pyramid) for a meaningful ensemble"),
    ],
)  # fmt: skip
def test_bad_numbers_are_refused_before_loading(
    extra: list[str], message: str, depth_ckpt: Path, images: Path, tmp_path: Path, no_model_load: None, capsys
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--model", str(depth_ckpt), "--input", str(images), "--output", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("python -m experiments.infer: error:")


def test_bad_output_folders_are_refused_before_loading(
    depth_ckpt: Path, images: Path, tmp_path: Path, no_model_load: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = {
        a_file: f"--output {a_file} is a file, not a folder",
        a_file / "sub": f"--output {a_file / 'sub'} cannot be created: {a_file} is a file, not a folder",
        images: f"--output {images} is the --input folder",
    }
    for output, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            infer_main(depth_ckpt, images, output)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert a_file.read_text() == "mine"

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: make the probe fail as the kernel would

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(infer.tempfile, "TemporaryFile", denied)
    with pytest.raises(SystemExit):
        infer_main(depth_ckpt, images, locked)
    assert f"--output {locked} is not a writable folder (PermissionError: Permission denied)" in capsys.readouterr().err
    locked.chmod(0o700)


def test_output_inside_input_is_never_read_as_input(
    depth_ckpt: Path, images: Path, capsys: pytest.CaptureFixture
) -> None:
    out = images / "predictions"
    for _ in range(2):
        assert infer_main(depth_ckpt, images, out) == 0
    printed = capsys.readouterr().out
    assert printed.count("files under it are not read as input") == 2  # once per run
    assert "skipped 3: 3 already done" in printed  # the second run found only a, b and c
    assert files_of(out) == sorted(f"{n}_depth{s}" for n in NAMES for s in (".npy", "_16bit.png", "_colored.png"))


def test_symlink_loops_are_reported_and_not_followed(
    depth_ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (images / "sub").mkdir()
    (images / "sub" / "up").symlink_to("..")  # a loop
    other = make_images(tmp_path / "elsewhere")
    (images / "linked").symlink_to(other)  # a linked folder: searched
    (images / "gone.png").symlink_to(tmp_path / "missing.png")  # a broken link: a counted skip
    out = tmp_path / "out"
    assert infer_main(depth_ckpt, images, out) == 0
    captured = capsys.readouterr()
    assert (
        f"warning: {images / 'sub' / 'up'} is a symbolic link loop (it leads back to {images.resolve()})"
        in captured.err
    )
    assert "wrote 6 of 7 images" in captured.out and "1 unreadable or failed" in captured.out
    assert "gone.png: unreadable" in captured.out
    assert {f.split("_depth")[0] for f in files_of(out)} == {*NAMES, *(f"linked/{n}" for n in NAMES)}


# ------------------------------------------------------------------------------ 5. identical ensemble members
def test_deterministic_ensemble_is_refused_before_computing(
    depth_ckpt: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_predict(*args, **kwargs):
        raise AssertionError("computed an ensemble of identical members")

    monkeypatch.setattr(infer, "predict", no_predict)
    assert infer_main(depth_ckpt, images, tmp_path / "out", "--ensemble", "3") == 2  # the model's default: zeros
    err = capsys.readouterr().err
    assert "initial latent 'zeros'" in err and "use --init gaussian (or pyramid) for a meaningful ensemble" in err
    assert files_of(tmp_path / "out") == []


# ------------------------------------------------------------------------------ 6. folder settings
@pytest.fixture(scope="module")
def normals_folder(normals_model: GeometryEstimator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(normals_model, tmp_path_factory.mktemp("export") / "normals", processing_resolution=64)


def edited_copy(folder: Path, dest: Path, index: dict | None = None, scheduler: dict | None = None) -> Path:
    copy = shutil.copytree(folder, dest)
    for name, changes in (("model_index.json", index), ("scheduler/scheduler_config.json", scheduler)):
        if changes:
            path = copy / name
            path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return copy


def test_half_z_range_normals_folder_decodes_like_the_stock_pipeline(
    normals_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    half = edited_copy(normals_folder, tmp_path / "half", index={"use_full_z_range": False})
    image = make_images(tmp_path / "in", size=(64, 64)) / "a.png"
    assert infer.main(["--model", str(half), "--input", str(image), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "from the folder's model_index.json / scheduler_config.json:" in printed
    assert "steps=1" in printed and "processing_resolution=64" in printed and "spacing=trailing" in printed
    assert "use_full_z_range=False" in printed
    ours = np.load(tmp_path / "out/a_normals.npy")

    pipeline = MarigoldNormalsPipeline.from_pretrained(half)
    pipeline.set_progress_bar_config(disable=True)
    rgb = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    stock = pipeline(rgb, latents=torch.zeros(1, 4, 8, 8), output_type="np").prediction[0]
    assert pipeline.use_full_z_range is False and ours.shape == stock.shape == (64, 64, 3)
    np.testing.assert_allclose(ours, stock, atol=2e-5, rtol=0)
    assert ours[..., 2].min() >= 0  # half range: z never points away from the camera

    # The module itself (fit / validate / test from such a folder) decodes it the same way.
    assert GeometryEstimator(pretrained=str(half), task="normals").task.use_full_z_range is False
    assert GeometryEstimator(pretrained=str(normals_folder), task="normals").task.use_full_z_range is True

    # The fault this guards against: decoded as full range, the same folder's normals are far off.
    full = build_task("normals")
    assert full.use_full_z_range and not build_task("normals", use_full_z_range=False).use_full_z_range
    assert infer.main(["--model", str(normals_folder), "--input", str(image), "--output", str(tmp_path / "full")]) == 0
    assert np.abs(np.load(tmp_path / "full/a_normals.npy") - stock).max() > 0.1


def test_folder_defaults_are_used_unless_given(
    normals_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    edited = edited_copy(
        normals_folder, tmp_path / "edited", index={"default_processing_resolution": 0, "default_denoising_steps": 2},
        scheduler={"timestep_spacing": "leading"},
    )  # fmt: skip
    image = make_images(tmp_path / "in") / "a.png"
    args = ["--model", str(edited), "--input", str(image)]
    assert infer.main([*args, "--output", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "num_steps=2, spacing='leading'" in printed and "processing_resolution=0," in printed  # 0 = native, not 768
    assert "steps=2, processing_resolution=0, spacing=leading, use_full_z_range=True" in printed
    assert infer.main([*args, "--output", str(tmp_path / "b"), "--steps", "1", "--spacing", "trailing"]) == 0
    printed = capsys.readouterr().out
    assert "num_steps=1, spacing='trailing'" in printed
    assert (
        "folder's model_index.json / scheduler_config.json: processing_resolution=0, use_full_z_range=True" in printed
    )
    # no timestep_spacing in the scheduler's config: the stock pipeline runs its class default (DDIM: leading)
    config_path = edited / "scheduler/scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "timestep_spacing"}))
    assert infer.main([*args, "--output", str(tmp_path / "c")]) == 0
    assert "spacing='leading'" in capsys.readouterr().out


# ------------------------------------------------------------------------------ 8. model sources
def test_incomplete_or_missing_model_folders_are_named(
    depth_model: GeometryEstimator, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder = export_model(depth_model, tmp_path / "exported", processing_resolution=32)
    broken = shutil.copytree(folder, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    assert infer_main(broken, images, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"could not load model {broken}" in err and "it lacks vae/ (expected unet/, vae/" in err

    # A checkpoint whose pretrained source folder is gone: refused at once, never tried as a hub id.
    def no_hub(*args, **kwargs):
        raise AssertionError("tried to load a missing local folder")

    moved = GeometryEstimator(pretrained=str(shutil.copytree(folder, tmp_path / "source")))
    ckpt = save_checkpoint(moved, tmp_path / "from_folder.ckpt")
    shutil.rmtree(tmp_path / "source")
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_hub)
    assert infer_main(ckpt, images, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"model folder '{tmp_path / 'source'}' does not exist" in err and "not tried as a hub id" in err
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "exp")])
    assert "does not exist" in str(exit_info.value.code) and not (tmp_path / "exp").exists()

    not_a_model = tmp_path / "run_folder"
    not_a_model.mkdir()
    assert infer_main(not_a_model, images, tmp_path / "out") == 1
    assert "is a folder but not a diffusers model folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 9. checkpoints and configs
def model_config(path: Path, **init_args) -> Path:
    path.write_text(yaml.safe_dump({"model": {"class_path": "lightning_modules.module.GeometryEstimator",
                                              "init_args": {"tiny": {"seed": 0}, **init_args}}}))  # fmt: skip
    return path


def test_checkpoint_and_config_of_different_models_are_refused(
    normals_ckpt: Path, depth_ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    implicit = model_config(tmp_path / "depth.yaml")  # says nothing about the task: depth by default
    explicit = model_config(tmp_path / "depth_explicit.yaml", task="depth")
    for config, said in ((implicit, "nothing (default 'depth')"), (explicit, "'depth'")):
        assert infer_main(normals_ckpt, images, tmp_path / "out", "--config", config) == 1
        err = capsys.readouterr().err
        assert f"checkpoint {normals_ckpt} and config {config} describe different models" in err
        assert f"task: config says {said}, checkpoint has 'normals'" in err
        with pytest.raises(SystemExit) as exit_info:
            export_main(["--ckpt_path", str(normals_ckpt), "--config", str(config), "--out", str(tmp_path / "exp")])
        assert f"task: config says {said}, checkpoint has 'normals'" in str(exit_info.value.code)
    assert files_of(tmp_path / "out") == [] and not (tmp_path / "exp").exists()
    # the matching config is accepted (its tiny: {seed: 0} equals the checkpoint's TinySpec)
    assert infer_main(depth_ckpt, images, tmp_path / "out", "--config", implicit) == 0
    assert (
        infer_main(normals_ckpt, images, tmp_path / "n", "--config", model_config(tmp_path / "n.yaml", task="normals"))
        == 0
    )


def test_truncated_or_foreign_checkpoints_are_named(
    depth_ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(depth_ckpt.read_bytes()[: depth_ckpt.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for bad in (truncated, empty):
        assert infer_main(bad, images, tmp_path / "out") == 1
        captured = capsys.readouterr()
        assert_no_traceback(captured)
        assert f"{bad} is not a readable torch checkpoint (truncated or corrupt?" in captured.err
        with pytest.raises(SystemExit) as exit_info:
            export_main(["--ckpt_path", str(bad), "--out", str(tmp_path / "exp")])
        assert "is not a readable torch checkpoint" in str(exit_info.value.code)
    not_lightning = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(1)}, not_lightning)
    assert infer_main(not_lightning, images, tmp_path / "out") == 1
    assert "is not a Lightning checkpoint (no 'state_dict')" in capsys.readouterr().err


def test_weights_that_do_not_fit_the_config_are_named(
    depth_model: GeometryEstimator, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = save_checkpoint(depth_model, tmp_path / "weights.ckpt", hparams=False)
    wider = TinySpec().unet | {"block_out_channels": [16, 32]}
    config = model_config(tmp_path / "other.yaml", tiny={"seed": 0, "unet": wider})
    assert infer_main(weights, images, tmp_path / "out", "--config", config) == 1
    assert f"the weights in {weights} do not fit the model of config {config}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt_path", str(weights), "--config", str(config), "--out", str(tmp_path / "exp")])
    assert "do not fit the model" in str(exit_info.value.code)


# ------------------------------------------------------------------------------ 10. export folder, run configs
def test_export_refuses_a_non_empty_folder(depth_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite", "--processing_resolution", "30"], ["--overwrite", "--denoising_steps", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            export_main(["--ckpt_path", str(depth_ckpt), "--out", str(out), *extra])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{out} exists and is not empty: choose another --out or pass --overwrite" in err
    assert "--processing_resolution must be 0 (native) or a positive multiple of 8, got 30" in err
    assert "--denoising_steps must be >= 1, got 0" in err
    assert files_of(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt_path", str(depth_ckpt), "--out", str(out / "keep.txt")])
    assert "is a file, not a folder" in capsys.readouterr().err


def saved_run_config(path: Path, **init_args) -> Path:
    """Shaped like the config.yaml a `fit` run of an earlier version saved (every key it writes, including the
    removed eval_min_depth / eval_max_depth model arguments)."""
    model = {
        "objective": {"class_path": "lightning_modules.objectives.E2EObjective",
                      "init_args": {"noise": "zeros", "timestep": 999, "pyramid_strength": 0.9}},
        "pretrained": None, "tiny": {"seed": 0}, "conv_in_rule": "e2e_ft", "prompt_padding": "none", "task": "depth",
        "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01, "warmup_steps": 20,
        "decay_steps": 1500, "final_lr_ratio": 0.1, "gradient_checkpointing": False,
        "inference": {"num_steps": 1, "spacing": "trailing", "init_latent": "zeros", "seed": 1234},
        "eval_min_depth": 0.001, "eval_max_depth": 80.0, "preview_batches": 2, "evaluation": None, **init_args,
    }  # fmt: skip
    config = {
        "seed_everything": 2024,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1500, "default_root_dir": "runs/demo_e2e/fit",
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "runs", "name": "demo_e2e", "version": "fit"}}},
        "model": {"class_path": "lightning_modules.module.GeometryEstimator", "init_args": model},
        "data": {"class_path": "datamodules.datamodule.ShardDataModule", "init_args": {"batch_size": 4}},
        "batch": {"effective_batch_size": None}, "defaults": None, "optimizer": None, "lr_scheduler": None,
        "ckpt_path": None, "weights_only": None,
    }  # fmt: skip
    path.write_text("# lightning.pytorch==2.6.6\n" + yaml.safe_dump(config))
    return path


def test_a_runs_saved_config_works_for_export_and_infer(
    depth_model: GeometryEstimator, depth_ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = saved_run_config(tmp_path / "config.yaml")
    weights = save_checkpoint(depth_model, tmp_path / "weights.ckpt", hparams=False)
    for ckpt in (depth_ckpt, weights):  # checked against the checkpoint's hparams / the model built from it
        out = tmp_path / f"infer_{ckpt.stem}"
        assert infer_main(ckpt, images, out, "--config", config) == 0
        folder = tmp_path / f"export_{ckpt.stem}"
        export_main(
            ["--ckpt_path", str(ckpt), "--config", str(config), "--out", str(folder), "--processing_resolution", "32"]
        )
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "MarigoldDepthPipeline"
        assert infer_main(folder, images, tmp_path / f"again_{ckpt.stem}") == 0
        np.testing.assert_allclose(
            np.load(tmp_path / f"again_{ckpt.stem}/a_depth.npy"), np.load(out / "a_depth.npy"), atol=1e-6
        )
    err = capsys.readouterr().err
    assert "ignoring model arguments" in err and "eval_max_depth, eval_min_depth" in err
