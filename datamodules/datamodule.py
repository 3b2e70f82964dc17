"""The LightningDataModule: WebDataset shards (or synthetic ones generated on first use) -> batches."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader

from datamodules.streams import TrainStream, ValidationStream
from datamodules.synthetic import SyntheticSpec, ensure_synthetic


def expand_shards(patterns: str | list[str] | None) -> list[str]:
    """Shard paths from globs (`a/*.tar`), brace ranges (`a/train-{000000..000009}.tar`) or plain lists."""
    if patterns is None:
        return []
    found: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        for braced in wds.shardlists.expand_urls(os.path.expanduser(pattern)):
            matches = sorted(glob.glob(braced)) if glob.has_magic(braced) else [braced]
            missing = [m for m in matches if not Path(m).is_file()]
            if not matches or missing:
                raise FileNotFoundError(f"no shard file matches {missing[0] if missing else pattern!r}")
            found.extend(matches)
    return found


class ShardDataModule(L.LightningDataModule):
    """Streams shards in the project's format (datamodules.shard_format) as batches of the batch contract.

    Args:
        train_shards: training shards: glob, brace pattern or list (defaults to the synthetic ones).
        val_shards: validation shards, read completely and in order at every validation.
        batch_size: micro-batch per device (the effective batch is set by `batch.effective_batch_size`).
        val_batch_size: validation batch per device (default: `batch_size`).
        num_workers: dataloader workers per device, for training and validation.
        shuffle_buffer: samples held for shuffling the training stream.
        hflip_prob: probability of a horizontal flip per training sample (normals get n_x negated).
        seed: base seed of the training stream order.
        min_depth: lower end of the valid ground-truth range in metres (exclusive; tightened by a sample's own
            `min_depth` metadata).
        max_depth: upper end of the valid range in metres (exclusive; tightened by a sample's `max_depth`).
        synthetic: generate procedural scenes into a cache folder on first use and use them.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 100,
        hflip_prob: float = 0.5,
        seed: int = 0,
        min_depth: float = 1e-5,
        max_depth: float = 80.0,
        synthetic: SyntheticSpec | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if synthetic is None and train_shards is None and val_shards is None:
            raise ValueError("give train_shards / val_shards, or a `synthetic` spec to generate data")
        self.train_patterns, self.val_patterns = train_shards, val_shards
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.hflip_prob, self.seed = hflip_prob, seed
        self.min_depth, self.max_depth = min_depth, max_depth
        self.synthetic = synthetic
        self.stream_restarts = 0  # seeds the training order; bumped on resume so no order is replayed

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints: how often the training stream was (re)started."""
        return {"stream_restarts": self.stream_restarts}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """On resume, continue with a new training order instead of replaying the first one."""
        self.stream_restarts = int(state_dict.get("stream_restarts", 0)) + 1

    def prepare_data(self) -> None:
        """Generate the synthetic shards once (rank 0 of each node); a no-op when they exist."""
        if self.synthetic is not None:
            ensure_synthetic(self.synthetic)

    def _shards(self, split: str) -> list[str]:
        patterns = self.train_patterns if split == "train" else self.val_patterns
        if patterns is not None:
            return expand_shards(patterns)
        if self.synthetic is None:
            raise ValueError(f"no {split} shards configured")
        return ensure_synthetic(self.synthetic)[split]

    def _loader(self, stream: TrainStream | ValidationStream) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0, pin_memory=False
        )

    def train_dataloader(self) -> DataLoader:
        """Endless micro-batches of this rank's shards (Lightning: train by steps)."""
        stream = TrainStream(
            self._shards("train"),
            self.batch_size,
            self.shuffle_buffer,
            self.hflip_prob,
            self.seed,
            self.min_depth,
            self.max_depth,
        )
        stream.set_epoch(self.stream_restarts)
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader:
        """One ordered pass; every rank gets the same number of batches (padding has empty masks)."""
        return self._loader(ValidationStream(self._shards("val"), self.val_batch_size, self.min_depth, self.max_depth))

    def test_dataloader(self) -> DataLoader:
        """The validation shards."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The validation shards, for `python -m experiments predict` (image folders: `experiments.infer`)."""
        return self.val_dataloader()
