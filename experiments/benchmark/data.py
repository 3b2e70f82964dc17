"""Random-content samples and shards, the fixed training batch, and the data mode: TrainStream samples/s per worker."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torch.nn.functional import interpolate
from torch.utils.data import DataLoader, default_collate

from datamodules.shard_format import decode_sample, encode_sample
from datamodules.shard_writer import ShardWriter
from datamodules.streams import SkipLog, TrainStream, read_shards
from datamodules.targets import build_targets, no_skips
from experiments.benchmark.timing import Stats, clock


def _smooth(rng: np.random.Generator, height: int, width: int, channels: int, low: float, high: float) -> np.ndarray:
    """A random field [H,W,C]: uniform values on a 1/16 grid, upsampled bilinearly (compresses like a photo)."""
    coarse = torch.from_numpy(rng.uniform(low, high, (1, channels, max(2, height // 16), max(2, width // 16))))
    field = interpolate(coarse.float(), size=(height, width), mode="bilinear", align_corners=False)
    return field[0].permute(1, 2, 0).numpy()


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random uint8 RGB image: a smooth field plus a little pixel noise."""
    image = _smooth(rng, height, width, 3, 0, 255) + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def random_sample(key: str, height: int, width: int, rng: np.random.Generator) -> dict[str, Any]:
    """One encoded shard sample with random content: RGB, depth 0.5-10 m, a masked-out box, unit normals."""
    depth = _smooth(rng, height, width, 1, 0.5, 10.0)[..., 0]
    mask = np.ones((height, width), dtype=bool)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top : top + height // 8, left : left + width // 8] = False
    normals = _smooth(rng, height, width, 3, -1, 1) + np.array([0, 0, 1.5], dtype=np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    meta = dict(source="benchmark", domain="indoor", depth_scale=0.001, min_depth=1e-3, max_depth=65.0)
    return encode_sample(key, random_rgb(rng, height, width), depth, mask, normals, meta)


def write_random_shards(
    folder: Path, samples: int, height: int, width: int, per_shard: int, seed: int = 0
) -> list[str]:
    """`samples` random samples as shards of `per_shard` under `folder`; returns the shard paths."""
    rng = np.random.default_rng(seed)
    with ShardWriter(folder, "train", per_shard) as writer:
        for i in range(samples):
            writer.write(random_sample(f"bench-{i:06d}", height, width, rng))
    return [str(p) for p in writer.written]


def read_raw_samples(shards: list[str]) -> list[dict[str, Any]]:
    """Every raw sample (WebDataset member bytes) of the shards, in memory."""
    return list(read_shards(shards, SkipLog("benchmark")))


def write_png_folder(folder: Path, images: int, height: int, width: int, seed: int = 0) -> Path:
    """`images` random RGB PNGs named 0000.png, ... in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        Image.fromarray(random_rgb(rng, height, width)).save(folder / f"{i:04d}.png")
    return folder


def fixed_batch(height: int, width: int, batch: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """A training batch of the batch contract, as the training stream yields it (with `skipped` counts), on `device`."""
    rng = np.random.default_rng(seed)
    samples = [build_targets(decode_sample(random_sample(f"fixed-{i}", height, width, rng))) for i in range(batch)]
    for sample in samples:
        sample["skipped"] = no_skips()
    return move_data_to_device(default_collate(samples), device)


@dataclass
class DataSettings:
    """What the data mode measures: resolutions x dataloader workers, batches per timed window."""

    resolutions: list[tuple[int, int]] = field(default_factory=lambda: [(480, 640), (352, 1216)])
    workers: list[int] = field(default_factory=lambda: [0, 1, 2])
    normals: list[bool] = field(default_factory=lambda: [False, True])  # decode_normals: depth / normals training
    batch: int = 2
    samples: int = 32
    shuffle_buffer: int = 100
    warmup: int = 4
    iters: int = 16
    repeats: int = 3
    seed: int = 0


def stream_rate(shards: list[str], workers: int, s: DataSettings, normals: bool = True) -> list[float]:
    """Samples/s of TrainStream through a DataLoader, one value per consecutive window of `s.iters` batches.

    Warm-up (workers starting, shuffle buffers filling) is `s.warmup` batches per worker before the first window.
    """
    stream = TrainStream(shards, s.batch, shuffle_buffer=s.shuffle_buffer, seed=s.seed, decode_normals=normals)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False, pin_memory=False)
    device = torch.device("cpu")
    batches = iter(loader)
    for _ in range(s.warmup * max(workers, 1)):
        next(batches)
    rates = []
    for _ in range(s.repeats):
        start = clock(device)
        for _ in range(s.iters):
            next(batches)
        rates.append(s.iters * s.batch / (clock(device) - start))
    del batches  # stops the workers
    return rates


def run_data(s: DataSettings) -> list[dict[str, Any]]:
    """One row per (resolution, normals decoded, workers): samples/s in all and per worker (0: the main process)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dgft-bench-data-") as tmp:
        for height, width in s.resolutions:
            per_shard = max(1, s.samples // max(4, 2 * max(s.workers)))
            shards = write_random_shards(Path(tmp) / f"{height}x{width}", s.samples, height, width, per_shard, s.seed)
            for normals in s.normals:
                for workers in s.workers:
                    rates = Stats.of(stream_rate(shards, workers, s, normals))
                    per_worker = rates.scaled(1 / max(workers, 1))
                    rows.append(
                        dict(
                            height=height, width=width, decode_normals=normals, workers=workers,
                            samples_per_s=rates.as_dict(), samples_per_s_per_worker=per_worker.as_dict(),
                            target_per_worker=30.0,
                            meets_target=per_worker.median >= 30.0 if (height, width) == (480, 640) else None,
                        )
                    )  # fmt: skip
                    print(f"data {height}x{width} normals={normals} workers={workers}: {rates.median:.1f} samples/s",
                          flush=True)  # fmt: skip
    return rows
