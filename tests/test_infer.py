"""The folder command end to end on a tiny model, plus image reading/writing conventions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from experiments.infer import main
from lightning_modules.image_io import read_image, write_depth
from lightning_modules.module import GeometryEstimator
from lightning_modules.predictor import predict
from lightning_modules.tiny import TinySpec
from tests.helpers import export_model

GOOD = {"rgb": (40, 56), "gray16": (33, 47), "rgba": (30, 30), "sub/photo": (24, 36)}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained() -> GeometryEstimator:
    """Tiny model whose UNet differs from its seed-0 initialisation, so loading must really load the weights."""
    model = GeometryEstimator(tiny=TinySpec(seed=0)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.core.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def checkpoint(trained: GeometryEstimator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shaped like a Lightning checkpoint: no frozen VAE weights, the module's hyperparameters."""
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("vae.")}
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": dict(trained.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (*GOOD["rgb"], 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 65536, GOOD["gray16"], dtype=np.uint16)).save(root / "gray16.png")
    Image.fromarray(rng.integers(0, 256, (*GOOD["rgba"], 4), dtype=np.uint8), mode="RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (*GOOD["sub/photo"], 3), dtype=np.uint8)).save(root / "sub/photo.JPG")
    (root / "broken.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not an image")
    return root


def run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def test_folder_from_checkpoint(
    checkpoint: Path, inputs: Path, trained: GeometryEstimator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = run("--model", checkpoint, "--input", inputs, "--output", out, "--processing_resolution", 32)
    captured = capsys.readouterr()
    assert status == 0
    for name, (height, width) in GOOD.items():
        depth = np.load(out / f"{name}_depth.npy")
        assert depth.shape == (height, width) and depth.dtype == np.float32
        assert depth.min() >= 0 and depth.max() <= 1
        png16 = np.asarray(Image.open(out / f"{name}_depth_16bit.png"))
        assert png16.dtype == np.uint16 and png16.shape == (height, width)
        assert np.abs(png16 / 65535 - depth).max() <= 0.5 / 65535 + 1e-7
        colored = np.asarray(Image.open(out / f"{name}_depth_colored.png"))
        assert colored.shape == (height, width, 3) and colored.dtype == np.uint8
    # The checkpoint's weights were loaded: same result as the in-memory model.
    source = inputs / "sub/photo.JPG"
    expected = predict(trained.core, trained.task, read_image(source)[None], processing_resolution=32)["depth"][0, 0]
    np.testing.assert_allclose(np.load(out / "sub/photo_depth.npy"), expected.numpy(), atol=1e-6)
    assert not list(out.glob("broken*")) and not list(out.glob("notes*"))
    assert "wrote 4 of 5 images" in captured.out and "skipped 1" in captured.out
    assert "UNet calls: 4" in captured.out
    skipped = captured.out.split("skipped:")[1]
    assert "broken.png" in skipped and "unreadable" in skipped
    assert "warning: skipping" in captured.err and "broken.png" in captured.err


def test_diffusers_folder_uses_its_defaults_and_task(trained: GeometryEstimator, inputs: Path, tmp_path: Path) -> None:
    folder = export_model(trained, tmp_path / "depth_pipeline", processing_resolution=32)
    image = inputs / "rgb.png"
    assert run("--model", folder, "--input", image, "--output", tmp_path / "out") == 0
    expected = predict(trained.core, trained.task, read_image(image)[None], processing_resolution=32)["depth"][0, 0]
    np.testing.assert_allclose(np.load(tmp_path / "out/rgb_depth.npy"), expected.numpy(), atol=1e-6)

    normals_folder = shutil.copytree(folder, tmp_path / "normals_pipeline")
    index = json.loads((normals_folder / "model_index.json").read_text())
    index["_class_name"] = "MarigoldNormalsPipeline"
    (normals_folder / "model_index.json").write_text(json.dumps(index))
    args = ["--model", normals_folder, "--input", image, "--output", tmp_path / "normals", "--init", "gaussian"]
    assert run(*args, "--ensemble", 2) == 0
    normals = np.load(tmp_path / "normals/rgb_normals.npy")
    assert normals.shape == (*GOOD["rgb"], 3)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1, atol=1e-5)
    assert (tmp_path / "normals/rgb_normals_colored.png").is_file()
    assert np.asarray(Image.open(tmp_path / "normals/rgb_uncertainty.png")).max() == 255
    assert run(*args, "--task", "depth") == 1  # contradicts the folder


def test_checkpoint_with_run_config(trained: GeometryEstimator, inputs: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "weights_only.ckpt"
    torch.save({"state_dict": {k: v for k, v in trained.state_dict().items() if not k.startswith("vae.")}}, ckpt)
    config = tmp_path / "config.yaml"
    model = {"class_path": "lightning_modules.module.GeometryEstimator", "init_args": {"tiny": {"seed": 0}}}
    config.write_text(yaml.safe_dump({"model": model, "trainer": {"logger": False}}))
    image = inputs / "rgb.png"
    assert run("--model", ckpt, "--input", image, "--output", tmp_path / "no_config") == 1  # needs --config
    args = ["--model", ckpt, "--config", config, "--input", image, "--output", tmp_path / "out"]
    assert run(*args, "--processing_resolution", 32) == 0
    expected = predict(trained.core, trained.task, read_image(image)[None], processing_resolution=32)["depth"][0, 0]
    np.testing.assert_allclose(np.load(tmp_path / "out/rgb_depth.npy"), expected.numpy(), atol=1e-6)


def test_no_readable_image_exits_1(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in/bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert run("--model", checkpoint, "--input", tmp_path / "in", "--output", tmp_path / "out") == 1
    assert "bad.jpg" in capsys.readouterr().out


def test_read_image_modes_and_orientation(tmp_path: Path) -> None:
    gray = np.array([[0, 65535], [32768, 1]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    assert image.shape == (3, 2, 2) and torch.equal(image[0], image[2])
    torch.testing.assert_close(image[0], torch.from_numpy(gray / 65535).float())

    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png")[:, 0, 1].tolist() == [0, 0, 1]

    rgba = np.zeros((1, 1, 4), dtype=np.uint8)
    rgba[..., 1] = 255  # green, fully transparent: alpha is dropped, not composited
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png")[:, 0, 0].tolist() == [0, 1, 0]

    tall = Image.new("RGB", (6, 4))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    tall.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(tmp_path / "r.jpg").shape == (3, 6, 4)


def test_depth_colours_near_red_far_blue(tmp_path: Path) -> None:
    write_depth(tmp_path / "x", torch.tensor([[0.0, 1.0]]))
    near, far = np.asarray(Image.open(tmp_path / "x_depth_colored.png"))[0].astype(int)
    assert near[0] > near[2] and far[2] > far[0]


def test_colored_depth_spans_the_colormap_while_the_data_stays_raw(tmp_path: Path) -> None:
    """A single prediction rarely spans [0, 1]: the colored PNG stretches its own min..max (red near, blue far),
    the npy and the 16-bit PNG keep the prediction itself."""
    depth = torch.tensor([[0.2, 0.4, 0.6]])
    write_depth(tmp_path / "x", depth)
    near, middle, far = np.asarray(Image.open(tmp_path / "x_depth_colored.png"))[0].astype(int)
    reference = write_depth(tmp_path / "full", torch.tensor([[0.0, 0.5, 1.0]]))[2]
    stretched, full = (np.asarray(Image.open(p)).astype(int) for p in (tmp_path / "x_depth_colored.png", reference))
    assert np.abs(stretched - full).max() <= 1  # 0.2..0.6 coloured like 0..1 (up to float round-off)
    assert near[0] > 150 > near[2] and far[2] > 100 > far[0]  # the colormap's red and blue ends
    np.testing.assert_array_equal(np.load(tmp_path / "x_depth.npy"), depth.numpy())
    assert np.asarray(Image.open(tmp_path / "x_depth_16bit.png")).tolist() == [[13107, 26214, 39321]]
    write_depth(tmp_path / "flat", torch.full((2, 2), 0.3))  # constant: coloured on the [0, 1] scale, no division
    assert len(set(map(tuple, np.asarray(Image.open(tmp_path / "flat_depth_colored.png")).reshape(-1, 3)))) == 1
