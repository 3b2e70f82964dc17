"""The folder command's pipeline (experiments/infer_pipeline.py): workers decode ahead in order, images of one size
are batched, a thread writes; the results equal the one-image-at-a-time path."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from PIL import Image

import experiments.infer as infer
import experiments.infer_pipeline as pipeline
from experiments.infer_pipeline import Decoded, ImageReader, OutputWriter, equal_size_batches
from lightning_modules.inference import initial_latent
from lightning_modules.module import GeometryEstimator
from lightning_modules.tiny import TinySpec

# name -> (height, width): runs of equal sizes, a size change inside a run of 4, a corrupt file among them
MIXED = {"a": (40, 56), "b": (40, 56), "c": (40, 56), "d": (33, 47), "e": (33, 47), "f": (40, 56), "g": (40, 56),
         "h": (40, 56), "i": (40, 56), "j": (40, 56), "k": (24, 36)}  # fmt: skip
CORRUPT = "c2.png"  # sorted between c and d


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny depth model whose UNet differs from its initialisation, shaped like a Lightning checkpoint."""
    model = GeometryEstimator(tiny=TinySpec(seed=0)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.core.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp("ckpt") / "depth.ckpt"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("core.vae.")}
    hparams = {"hyper_parameters": dict(model.hparams), "pytorch-lightning_version": lightning.__version__}
    torch.save({"state_dict": state, **hparams}, path)
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for name, size in MIXED.items():
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{name}.png")
    (root / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n not a whole png")
    return root


def infer_main(checkpoint: Path, input_path: Path, output: Path, *extra: str | int) -> int:
    args = ["--model", checkpoint, "--input", input_path, "--output", output, "--processing_resolution", 32, *extra]
    return infer.main([str(a) for a in args])


def outputs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


def images_of(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(np.int64) for p in sorted(folder.glob("*.png"))}


# ------------------------------------------------------------------------------ the pieces
def test_batches_are_consecutive_images_of_one_size_in_order() -> None:
    shapes = [(3, 4, 4), (3, 4, 4), (3, 4, 4), None, (3, 4, 4), (3, 2, 4), (3, 4, 4), (3, 4, 4)]
    items = [Decoded(i, None, "bad") if s is None else Decoded(i, torch.zeros(s)) for i, s in enumerate(shapes)]
    unreadable = []
    batches = equal_size_batches(items, 3, lambda index, reason: unreadable.append((index, reason)))
    assert [[item.index for item in batch] for batch in batches] == [[0, 1, 2], [4], [5], [6, 7]]
    assert unreadable == [(3, "bad")]
    assert [[i.index for i in b] for b in equal_size_batches(items, 1, lambda *_: None)] == [[0], [1], [2], [4], [5],
                                                                                           [6], [7]]  # fmt: skip


def test_a_full_batch_is_yielded_without_waiting_for_the_next_image() -> None:
    def items() -> Iterator[Decoded]:
        yield Decoded(0, torch.zeros(3, 2, 2))
        yield Decoded(1, torch.zeros(3, 2, 2))
        raise AssertionError("read the next image before predicting a full batch")

    assert len(next(equal_size_batches(items(), 2, lambda *_: None))) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_reader_keeps_the_order_and_reports_bad_files(mixed: Path, workers: int) -> None:
    paths = sorted(mixed.iterdir())
    reader = ImageReader(paths, workers)
    try:
        items = list(reader)
    finally:
        reader.close()
    assert reader.workers == workers
    assert [item.index for item in items] == list(range(len(paths)))
    bad = [item for item in items if item.image is None]
    assert [paths[item.index].name for item in bad] == [CORRUPT] and bad[0].reason.startswith("unreadable: ")
    good = [item for item in items if item.image is not None]
    assert [tuple(item.image.shape[1:]) for item in good] == list(MIXED.values())


def test_a_dead_worker_does_not_stop_the_run(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that kills its process (a crash on a hostile file, say): the rest is read in this process."""
    real_read = pipeline.read_image

    def crashing_read(path):
        if Path(path).name == "e.png" and torch.utils.data.get_worker_info() is not None:
            os._exit(1)
        return real_read(path)

    monkeypatch.setattr(pipeline, "read_image", crashing_read)
    paths = sorted(mixed.iterdir())
    warnings = []
    reader = ImageReader(paths, 2, warn=warnings.append)
    try:
        items = list(reader)
    finally:
        reader.close()
    assert [item.index for item in items] == list(range(len(paths)))
    assert sum(item.image is None for item in items) == 1  # only the corrupt file
    assert len(warnings) == 1 and "reading the remaining" in warnings[0] and "in the main process" in warnings[0]


def test_writer_counts_failures_per_image_and_drains_on_close() -> None:
    written, failed, order = [], [], []

    def write(stem: Path, prediction: torch.Tensor, uncertainty: torch.Tensor | None) -> None:
        time.sleep(0.01)
        order.append(stem.name)
        if stem.name == "b":
            raise OSError(28, "No space left on device")

    writer = OutputWriter(write, 2, written.append, lambda key, error: failed.append((key, str(error))))
    for key, name in enumerate("abcde"):
        writer.put(key, Path(name), torch.zeros(1), None)
    writer.close()
    assert order == list("abcde") and written == [0, 2, 3, 4]
    assert failed == [(1, "[Errno 28] No space left on device")]


def test_writer_threads_write_at_once_and_count_every_image() -> None:
    both_writing = threading.Barrier(2, timeout=10)  # passes only when two writes run at the same time
    written = []
    writer = OutputWriter(lambda *_: both_writing.wait(), 4, written.append, lambda *_: None, threads=2)
    for key in range(20):
        writer.put(key, Path("x"), torch.zeros(1), None)
    writer.close()
    assert sorted(written) == list(range(20))


def test_writer_queue_is_bounded() -> None:
    release = threading.Event()
    writer = OutputWriter(lambda *_: release.wait(), 2, lambda _: None, lambda *_: None)
    puts = threading.Thread(target=lambda: [writer.put(k, Path("x"), torch.zeros(1), None) for k in range(10)])
    puts.start()
    deadline = time.monotonic() + 10
    while writer._queue.qsize() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert puts.is_alive() and writer._queue.qsize() == 2  # one being written, two waiting: the producer waits
    release.set()
    puts.join(5)
    writer.close()


def test_writer_hands_an_interrupt_to_the_caller_and_writes_nothing_after_it() -> None:
    written = []

    def write(stem: Path, prediction: torch.Tensor, uncertainty: torch.Tensor | None) -> None:
        if stem.name == "b":
            raise KeyboardInterrupt

    writer = OutputWriter(write, 8, written.append, lambda *_: None)
    with pytest.raises(KeyboardInterrupt):  # from a put after it happened, or from close
        for key, name in enumerate("abcd"):
            writer.put(key, Path(name), torch.zeros(1), None)
        writer.close()
    writer.close()  # raised once: closing again only waits for the threads
    assert written == [0]


def test_writer_discard_drops_what_is_queued() -> None:
    started, release, written = threading.Event(), threading.Event(), []

    def write(stem: Path, prediction: torch.Tensor, uncertainty: torch.Tensor | None) -> None:
        started.set()
        release.wait()

    writer = OutputWriter(write, 8, written.append, lambda *_: None)
    for key in range(4):
        writer.put(key, Path("x"), torch.zeros(1), None)
    assert started.wait(10)
    closing = threading.Thread(target=writer.close, kwargs={"discard": True})
    closing.start()
    deadline = time.monotonic() + 10
    while not writer._discard and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()  # the write in progress ends after close(discard=True) began
    closing.join(10)
    assert not closing.is_alive() and written == [0]  # that one is finished, the queued ones are dropped


def test_every_batch_position_gets_the_noise_of_the_seed() -> None:
    for kind in ("gaussian", "pyramid"):
        noise = initial_latent(torch.Size((4, 4, 6, 8)), kind, 7, torch.device("cpu"), torch.float32)
        alone = initial_latent(torch.Size((1, 4, 6, 8)), kind, 7, torch.device("cpu"), torch.float32)
        assert all(torch.equal(noise[i], alone[0]) for i in range(4))


# ------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("init", [[], ["--init", "gaussian", "--steps", "2"]], ids=["zeros", "gaussian"])
def test_batched_prefetched_outputs_equal_one_at_a_time(
    checkpoint: Path, mixed: Path, tmp_path: Path, init: list[str], monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    """Workers change nothing (bit for bit); batching changes the network's float round-off only (batched
    convolution and matrix kernels sum in another order; the initial noise is the seed's in every position)."""
    batches = []
    real_predict = infer.predict

    def spy(core, task, images, *args, **kwargs):
        batches.append(tuple(images.shape))
        return real_predict(core, task, images, *args, **kwargs)

    monkeypatch.setattr(infer, "predict", spy)
    runs = {"old": ["--batch_size", 1, "--workers", 0], "prefetch": ["--batch_size", 1, "--workers", 2],
            "batched": ["--batch_size", 4, "--workers", 2]}  # fmt: skip
    printed = {}
    for name, options in runs.items():
        batches.clear()
        assert infer_main(checkpoint, mixed, tmp_path / name, *init, *options) == 0
        printed[name] = capsys.readouterr()
        shapes = list(batches)
        if name == "old":
            assert shapes == [(1, 3, h, w) for h, w in MIXED.values()]
    # a b c | c2 (corrupt) | d e | f g h i | j | k: consecutive images of one size, up to 4
    assert [s[0] for s in shapes] == [3, 2, 4, 1, 1] and shapes[1][2:] == MIXED["d"]
    for name, captured in printed.items():
        assert f"wrote {len(MIXED)} of {len(MIXED) + 1} images" in captured.out, name
        assert "skipped 1: 1 unreadable or failed" in captured.out
        assert f"{CORRUPT}: unreadable" in captured.out.split("skipped:")[1]
        assert f"warning: skipping {mixed / CORRUPT}: unreadable" in captured.err
        assert f"UNet calls: {len(MIXED) * (2 if init else 1)};" in captured.out

    old, prefetch, batched = (outputs(tmp_path / name) for name in runs)
    assert sorted(old) == sorted(f"{n}_depth.npy" for n in MIXED) and sorted(prefetch) == sorted(old)
    files = {run: {p.name: p.read_bytes() for p in (tmp_path / run).iterdir()} for run in ("old", "prefetch")}
    assert files["old"] == files["prefetch"] and len(files["old"]) == 3 * len(MIXED)  # every file, byte for byte
    assert sorted(batched) == sorted(old)
    worst = max(float(np.abs(old[f] - batched[f]).max()) for f in old)
    assert worst < 1e-5, f"batched differs from one at a time by {worst}"
    batched_images = images_of(tmp_path / "batched")
    for f, image in images_of(tmp_path / "old").items():  # the PNGs: round-off moves a level (more once stretched)
        assert np.abs(image - batched_images[f]).max() <= (1 if "16bit" in f else 3), f


def test_bf16_with_batches_on_the_cpu(checkpoint: Path, mixed: Path, tmp_path: Path, capsys) -> None:
    assert infer_main(checkpoint, mixed, tmp_path / "fp32", "--batch_size", 4, "--workers", 0) == 0
    assert infer_main(checkpoint, mixed, tmp_path / "bf16", "--batch_size", 4, "--workers", 2, "--bf16") == 0
    assert f"wrote {len(MIXED)} of {len(MIXED) + 1} images" in capsys.readouterr().out
    fp32, bf16 = outputs(tmp_path / "fp32"), outputs(tmp_path / "bf16")
    assert sorted(bf16) == sorted(fp32)
    for name, depth in bf16.items():
        assert depth.dtype == np.float32 and np.isfinite(depth).all()
        assert np.abs(depth - fp32[name]).max() < 0.05, name  # bfloat16 keeps 8 bits of mantissa


def test_a_batch_that_fails_is_retried_one_image_at_a_time(
    checkpoint: Path, mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real_predict = infer.predict

    def no_batches_of_four(core, task, images, *args, **kwargs):
        if images.shape[0] == 4:
            raise RuntimeError("out of memory (injected)")
        return real_predict(core, task, images, *args, **kwargs)

    monkeypatch.setattr(infer, "predict", no_batches_of_four)
    assert infer_main(checkpoint, mixed, tmp_path / "out", "--batch_size", 4, "--workers", 0) == 0
    captured = capsys.readouterr()
    message = "a batch of 4 images failed (RuntimeError: out of memory (injected)); predicting them one at a time"
    assert message in captured.err
    assert f"wrote {len(MIXED)} of {len(MIXED) + 1} images" in captured.out


def test_workers_must_not_be_negative(checkpoint: Path, mixed: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        infer_main(checkpoint, mixed, tmp_path / "out", "--workers", -1)
    assert exit_info.value.code == 2
    assert "--workers must be >= 0 (0 = read in the main process), got -1" in capsys.readouterr().err
