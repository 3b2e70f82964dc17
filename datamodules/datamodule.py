"""The LightningDataModule: WebDataset shards (or synthetic ones generated on first use) -> batches.

Skipped data is totalled in the main process: every batch's `skipped` counts (the batch contract, filled by the
streams in whichever dataloader worker) are added up per stage as the batch arrives, and `teardown` logs one line
per stage, e.g. "validation read 120 samples, skipped 3: 2 bad_image, 1 truncated_shard" (a warning when something
was skipped; per rank under DDP; the sanity check's batches are left out).
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import webdataset as wds
from torch.utils.data import DataLoader

from datamodules.mixture import MixedTrainStream, TrainSource, source_seed
from datamodules.shard_format import first_metadata
from datamodules.streams import PAD_KEY, TrainStream, ValidationStream, distributed_rank
from datamodules.synthetic import SyntheticSpec, ensure_synthetic
from datamodules.targets import describe_skips, skip_totals

log = logging.getLogger(__name__)
STAGE_LABELS = {"train": "training", "validate": "validation", "test": "test", "predict": "predict"}


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


def conversion_hint(pattern: str, root: str | None) -> str:
    """The command that writes the shards `pattern` names (its first folder is the converter's name)."""
    name = Path(pattern).parts[0] if len(Path(pattern).parts) > 1 else "<name>"
    out = os.path.join(root, name) if root is not None else name
    hint = f"python -m datamodules.convert {name} --src <raw {name} folder> --out {out}"
    try:
        from datamodules.convert import DATASETS
    except ImportError:  # a converter's optional dependency is missing: the hint stays as it is
        return hint
    if name not in DATASETS:
        base = max((n for n in DATASETS if name.startswith(f"{n}_")), key=len, default=None)
        hint += (
            f"\n  ({name!r} is not a converter name; "
            + (f"it looks like a part of {base!r}, see `python -m datamodules.convert {base} --help`; " if base else "")
            + f"converters: {', '.join(DATASETS)})"
        )
    return hint


class ShardDataModule(L.LightningDataModule):
    """Streams shards in the project's format (datamodules.shard_format) as batches of the batch contract.

    Args:
        train_shards: training shards: glob, brace pattern or list (defaults to the synthetic ones).
        train_sources: instead of `train_shards`, several training datasets with probabilities; every micro-batch
            comes from one of them (datamodules.mixture, docs/method.md §4.5).
        val_shards: validation shards, read in order at every validation.
        test_shards: shards for `test` and `predict`, always read completely (default: `val_shards`).
        shard_root: folder that relative shard paths (train, sources, val, test) are taken under.
        val_max_samples: validate on the first N samples of the validation shards only (a fixed subset).
        val_keys: validate on these sample keys only: a list, or a text file with one key per line.
        batch_size: micro-batch per device (the effective batch is set by `batch.effective_batch_size`).
        val_batch_size: validation batch per device (default: `batch_size`).
        num_workers: dataloader workers per device, for training and validation.
        shuffle_buffer: samples held for shuffling the training stream.
        hflip_prob: probability of a horizontal flip per training sample (normals get n_x negated).
        seed: base seed of the training stream order (combined with the global step at which the stream starts).
        min_depth: lower end of the valid ground-truth range in metres (exclusive; tightened by a sample's own
            `min_depth` metadata).
        max_depth: upper end of the valid range in metres (exclusive; tightened by a sample's `max_depth`).
        synthetic: generate procedural scenes into a cache folder on first use and use them.
        decode_normals: decode `normals.png` (a third of the decode time at 480x640); False: batches carry no
            `normals` at all.
            None (default): `python -m experiments` sets it from the model's task (depth models skip normals),
            True elsewhere.
        pin_memory: page-locked batches for faster, asynchronous copies to a GPU; None (default): when the
            trainer runs on CUDA.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        train_sources: list[TrainSource] | None = None,
        test_shards: str | list[str] | None = None,
        shard_root: str | None = None,
        val_max_samples: int | None = None,
        val_keys: str | list[str] | None = None,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 100,
        hflip_prob: float = 0.5,
        seed: int = 0,
        min_depth: float = 1e-5,
        max_depth: float = 80.0,
        synthetic: SyntheticSpec | None = None,
        decode_normals: bool | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        if synthetic is None and train_shards is None and val_shards is None and not train_sources and not test_shards:
            raise ValueError("give train_shards / train_sources / val_shards / test_shards, or a `synthetic` spec")
        if train_shards is not None and train_sources:
            raise ValueError("give either train_shards (one dataset) or train_sources (a mixture), not both")
        if val_max_samples is not None and val_max_samples < 1:
            raise ValueError(f"val_max_samples must be >= 1, got {val_max_samples}")
        names = [source.name for source in train_sources or []]
        if len(set(names)) != len(names):
            raise ValueError(f"train_sources need distinct names, got {names}")
        self.train_patterns, self.val_patterns = train_shards, val_shards
        self.train_sources, self.test_patterns, self.shard_root = list(train_sources or []), test_shards, shard_root
        self.val_max_samples, self.val_keys = val_max_samples, val_keys
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.hflip_prob, self.seed = hflip_prob, seed
        self.min_depth, self.max_depth = min_depth, max_depth
        self.synthetic = synthetic
        self.decode_normals, self.pin_memory = decode_normals, pin_memory
        self.stream_start_step = 0  # optimiser step at which the current training stream started
        self.data_totals: dict[str, dict[str, Any]] = {}  # per stage: samples read, skips by reason (main process)

    def _start_step(self) -> int:
        """The trainer's global step (restored from the checkpoint before Lightning asks for the dataloader)."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def prepare_data(self) -> None:
        """Generate the synthetic shards once (rank 0 of each node); a no-op when they exist."""
        if self.synthetic is not None:
            ensure_synthetic(self.synthetic)

    def _expand(self, patterns: str | list[str], split: str = "") -> list[str]:
        """Shard paths, relative patterns taken under `shard_root`; missing ones name the conversion command."""
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        root = os.path.expanduser(self.shard_root) if self.shard_root is not None else None
        found = []
        for pattern in patterns:
            full = os.path.join(root, os.path.expanduser(pattern)) if root is not None else pattern
            try:
                found += expand_shards(full)
            except FileNotFoundError as error:
                under = f" under shard_root {self.shard_root!r}" if root is not None else ""
                raise FileNotFoundError(
                    f"{error.args[0]} (the {split + ' ' if split else ''}shards {pattern!r}{under}). "
                    f"Convert the raw dataset first:\n  {conversion_hint(pattern, root)}"
                ) from None
        return found

    def check_shards(self, split: str = "test") -> None:
        """Raise FileNotFoundError (the expected pattern, the conversion command) if a split's shards are missing.

        `split`: `train`, `val`, `test` or `predict` (the test shards, by default the validation ones), or `fit`
        (train and val). Only configured shard patterns are checked: synthetic data is generated when first used.
        Cheap (file names only), so a command can call it before it creates any run folder.
        """
        splits = {"fit": ("train", "val"), "predict": ("test",), "validate": ("val",)}.get(split, (split,))
        for name in splits:
            if name == "test" and self.test_patterns is None:
                name = "val"
            if name == "train" and self.train_sources:
                for source in self.train_sources:
                    self._expand(source.shards, f"train ({source.name})")
                continue
            patterns = {"train": self.train_patterns, "val": self.val_patterns, "test": self.test_patterns}.get(name)
            if name not in ("train", "val", "test"):
                raise ValueError(f"unknown split {split!r}: train, val, test, predict or fit")
            if patterns is not None:
                self._expand(patterns, name)

    def _shards(self, split: str) -> list[str]:
        if split == "test" and self.test_patterns is None:
            split = "val"
        patterns = {"train": self.train_patterns, "val": self.val_patterns, "test": self.test_patterns}[split]
        if patterns is not None:
            return self._expand(patterns, split)
        if self.synthetic is None:
            raise ValueError(f"no {split} shards configured")
        return ensure_synthetic(self.synthetic)[split]

    def _normals(self) -> bool:
        return self.decode_normals is not False

    def _pinned(self) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        device = getattr(getattr(getattr(self, "trainer", None), "strategy", None), "root_device", None)
        return getattr(device, "type", "cpu") == "cuda"

    def _train_stream(self) -> TrainStream | MixedTrainStream:
        """One source (`train_shards` / synthetic) or a mixture of `train_sources`."""
        settings = (self.batch_size, self.shuffle_buffer, self.hflip_prob)
        ranges = (self.min_depth, self.max_depth)
        normals = self._normals()
        if not self.train_sources:
            return TrainStream(self._shards("train"), *settings, self.seed, *ranges, decode_normals=normals)
        streams = {
            s.name: TrainStream(
                self._expand(s.shards, f"train ({s.name})"),
                *settings,
                source_seed(self.seed, s.name),
                *ranges,
                decode_normals=normals,
            )  # fmt: skip
            for s in self.train_sources
        }
        return MixedTrainStream(streams, {s.name: s.probability for s in self.train_sources}, self.seed)

    def _selected_keys(self) -> set[str] | None:
        if self.val_keys is None:
            return None
        if isinstance(self.val_keys, str):
            lines = Path(os.path.expanduser(self.val_keys)).read_text().splitlines()
            return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
        return set(self.val_keys)

    def _loader(self, stream: TrainStream | ValidationStream) -> DataLoader:
        workers = self.num_workers
        if isinstance(stream, ValidationStream):
            # Counts the shards' samples (manifest.json, or tar headers) once per rank here: forked workers
            # inherit the cache, and every worker of every rank plans the same shard-level split from them.
            stream.sample_counts()
        return DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0, pin_memory=self._pinned()
        )

    def train_dataloader(self) -> DataLoader:
        """Endless micro-batches of this rank's shards (Lightning: train by steps)."""
        stream = self._train_stream()
        # The order's seed includes the step it starts at: a run resumed at step k reads a new order (no replay
        # of step 0's), and every resume from the same checkpoint reads the same one.
        self.stream_start_step = self._start_step()
        stream.set_epoch(self.stream_start_step)
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader:
        """One ordered pass over the configured subset, each shard read by one rank's worker (split by sample with
        `val_keys`); all ranks get as many batches (padding has empty masks)."""
        stream = ValidationStream(
            self._shards("val"),
            self.val_batch_size,
            self.min_depth,
            self.max_depth,
            max_samples=self.val_max_samples,
            keys=self._selected_keys(),
            decode_normals=self._normals(),
        )
        return self._loader(stream)

    def test_dataloader(self) -> DataLoader:
        """Every sample of the test shards (default: the validation shards), no subset."""
        stream = ValidationStream(
            self._shards("test"), self.val_batch_size, self.min_depth, self.max_depth,
            decode_normals=self._normals(),
        )  # fmt: skip
        return self._loader(stream)

    def shard_metadata(self, split: str = "test") -> dict[str, Any] | None:
        """Metadata of the first sample of a split's first shard (its `eval_*` keys describe the protocol)."""
        shards = self._shards(split)
        return first_metadata(shards[0]) if shards else None

    def predict_dataloader(self) -> DataLoader:
        """The test shards, for `python -m experiments predict` (image folders: `experiments.infer`)."""
        return self.test_dataloader()

    # ------------------------------------------------------------------------------------- skip accounting
    def _stage(self) -> str | None:
        """The running stage's label (training, validation, test, predict), None in the sanity check or unknown."""
        trainer = getattr(self, "trainer", None)
        state = getattr(getattr(trainer, "state", None), "stage", None)
        value = getattr(state, "value", state)
        if value == "sanity_check":
            return None
        return STAGE_LABELS.get(value)

    def record_batch(self, batch: Any, stage: str) -> None:
        """Add a batch's real samples and its `skipped` counts to the totals of `stage`."""
        if not isinstance(batch, dict):
            return
        totals = self.data_totals.setdefault(stage, {"samples": 0, "skipped": Counter()})
        totals["samples"] += sum(1 for key in batch.get("key", ()) if key != PAD_KEY)
        skipped = batch.get("skipped")
        if skipped is not None:
            totals["skipped"].update(skip_totals(skipped))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count each batch's samples and skips in the main process, whatever the number of workers."""
        stage = self._stage()
        if stage is not None:
            self.record_batch(batch, stage)
        return batch

    def skip_report(self) -> list[str]:
        """One line per stage seen: "validation read 120 samples, skipped 3: 2 bad_image, 1 truncated_shard"."""
        rank, world = distributed_rank()
        prefix = f"rank {rank}/{world}: " if world > 1 else ""
        return [
            f"{prefix}{stage} read {totals['samples']} samples, skipped {describe_skips(dict(totals['skipped']))}"
            for stage, totals in self.data_totals.items()
        ]

    def teardown(self, stage: str) -> None:
        """Log the totals of skipped data of the command that ends, then start counting afresh."""
        for line, totals in zip(self.skip_report(), self.data_totals.values()):
            log.log(logging.WARNING if sum(totals["skipped"].values()) else logging.INFO, "%s", line)
        self.data_totals = {}
