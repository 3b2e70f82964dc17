"""Write procedurally generated scenes (datamodules.scenes) as shards in the project's shard format."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from datamodules.scenes import generate_scene
from datamodules.shard_writer import AtomicShardWriter
from datamodules.shard_format import encode_sample

MANIFEST = "manifest.json"


@dataclass
class SyntheticSpec:
    """Size and seed of a synthetic dataset, generated into `cache_dir` on first use.

    Args:
        num_train: training scenes.
        num_val: validation scenes (seeded apart from training).
        height, width: image size (multiples of 8).
        seed: base seed; scene i of split s uses a seed derived from (seed, s, i).
        samples_per_shard: scenes per tar file (plan at least devices x workers training shards).
        cache_dir: target folder; default `$DGFT_CACHE/synthetic/<hash>` or
            `~/.cache/diffusion-geometry-ft/synthetic/<hash>`, the hash covering every other field.
    """

    num_train: int = 512
    num_val: int = 32
    height: int = 96
    width: int = 128
    seed: int = 0
    samples_per_shard: int = 64
    cache_dir: str | None = None

    def folder(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        fields = {k: v for k, v in asdict(self).items() if k != "cache_dir"}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        root = Path(os.environ.get("DGFT_CACHE", Path.home() / ".cache" / "diffusion-geometry-ft"))
        return root.expanduser() / "synthetic" / digest


def _scene_seed(base: int, split: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}/{split}/{index}".encode()).digest()[:4], "little")


def generate_split(spec: SyntheticSpec, split: str, count: int) -> list[Path]:
    """Write `count` scenes as `<split>-NNNNNN.tar` shards; shards already complete are kept (resume)."""
    if spec.height % 8 or spec.width % 8:
        raise ValueError(f"synthetic image size {spec.height}x{spec.width} must be a multiple of 8")
    folder = spec.folder()
    folder.mkdir(parents=True, exist_ok=True)
    writer = AtomicShardWriter(folder, split)
    shards = []
    starts = range(0, count, spec.samples_per_shard)
    for shard_index, start in enumerate(tqdm(starts, desc=f"generating {split} shards", unit="shard")):
        indices = range(start, min(start + spec.samples_per_shard, count))
        samples = (_encoded(spec, split, i) for i in indices)
        shards.append(writer.write(shard_index, samples))
    return shards


def _encoded(spec: SyntheticSpec, split: str, index: int) -> dict:
    seed = _scene_seed(spec.seed, split, index)
    scene = generate_scene(seed, spec.height, spec.width)
    focal = scene["focal"]
    meta = dict(
        source="synthetic",
        domain="indoor",
        depth_scale=0.001,
        min_depth=1e-3,
        max_depth=65.0,
        intrinsics=[focal, focal, spec.width / 2, spec.height / 2],
        seed=seed,
    )
    return encode_sample(f"synthetic-{split}-{index:06d}", scene["rgb"], scene["depth"], scene["mask"], scene["normals"], meta)


def ensure_synthetic(spec: SyntheticSpec) -> dict[str, list[str]]:
    """Generate the train and val splits unless the manifest says they are complete; return shard lists."""
    folder = spec.folder()
    manifest = folder / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if all(Path(p).is_file() for split in ("train", "val") for p in recorded[split]):
            return {split: recorded[split] for split in ("train", "val")}
    shards = {
        "train": [str(p) for p in generate_split(spec, "train", spec.num_train)],
        "val": [str(p) for p in generate_split(spec, "val", spec.num_val)],
    }
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({**shards, "spec": asdict(spec)}, indent=1))
    os.replace(tmp, manifest)  # the manifest appears last: its presence means the cache is complete
    return shards
