"""Write procedurally generated scenes (datamodules.scenes) as shards in the project's shard format.

Layout of a synthetic cache: `<cache>/<split>/<split>-NNNNNN.tar` plus `<cache>/<split>/manifest.json`, written
last: its presence means the split is complete. An interrupted run keeps its finished shards and resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.scenes import generate_scene
from datamodules.shard_format import encode_sample
from datamodules.shard_writer import AtomicShardWriter

MANIFEST = "manifest.json"


@dataclass
class SyntheticSpec:
    """Size and seed of a synthetic dataset, generated into `cache_dir` on first use.

    Args:
        num_train: training scenes.
        num_val: validation scenes (seeded apart from training).
        height: image height (multiple of 8).
        width: image width (multiple of 8).
        seed: base seed; scene i of split s uses a seed derived from (seed, s, i).
        samples_per_shard: scenes per tar file (plan at least devices x workers training shards).
        cache_dir: target folder; default `$DGFT_CACHE/synthetic/<hash>` if DGFT_CACHE is set, else
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
        """The cache folder of this spec."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        fields = {k: v for k, v in asdict(self).items() if k != "cache_dir"}
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return cache_root() / "synthetic" / digest


def cache_root() -> Path:
    """The framework's cache: `$DGFT_CACHE`, else `~/.cache/diffusion-geometry-ft` (synthetic data, the stand-in)."""
    return Path(os.environ.get("DGFT_CACHE", Path.home() / ".cache" / "diffusion-geometry-ft")).expanduser()


def scene_seed(base: int, split: str, index: int) -> int:
    """Seed of scene `index` of `split`: independent streams per split and index."""
    return int.from_bytes(hashlib.sha256(f"{base}/{split}/{index}".encode()).digest()[:4], "little")


def encoded_scene(split: str, index: int, height: int, width: int, seed: int) -> dict[str, Any]:
    """Render scene `index` of `split` and encode it as shard members."""
    scene_id = scene_seed(seed, split, index)
    scene = generate_scene(scene_id, height, width)
    focal = scene["focal"]
    meta = dict(
        source="synthetic",
        domain="indoor",
        depth_scale=0.001,
        min_depth=1e-3,
        max_depth=65.0,
        intrinsics=[focal, focal, width / 2, height / 2],
        seed=scene_id,
    )
    key = f"synthetic-{split}-{index:06d}"
    return encode_sample(key, scene["rgb"], scene["depth"], scene["mask"], scene["normals"], meta)


def _write_shard(job: tuple[Path, str, int, range, int, int, int]) -> Path:
    folder, split, shard_index, indices, height, width, seed = job
    samples = (encoded_scene(split, i, height, width, seed) for i in indices)
    return AtomicShardWriter(folder, split).write(shard_index, samples)


def generate_synthetic_shards(
    out_dir: str | Path,
    num_samples: int,
    height: int,
    width: int,
    seed: int,
    samples_per_shard: int,
    split_name: str,
    processes: int = 1,
) -> list[Path]:
    """Write `num_samples` scenes as `<split_name>-NNNNNN.tar` in `out_dir`; resume, manifest last.

    Returns the shard paths. A complete `out_dir` (manifest present and matching) is returned as is; a
    manifest for other parameters is an error (use another folder).
    """
    if height % 8 or width % 8:
        raise ValueError(f"synthetic image size {height}x{width} must be a multiple of 8")
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"need num_samples >= 1 and samples_per_shard >= 1, got {num_samples}, {samples_per_shard}")
    folder = Path(out_dir).expanduser()
    params = dict(
        split=split_name, num_samples=num_samples, height=height, width=width, seed=seed,
        samples_per_shard=samples_per_shard,
    )  # fmt: skip
    manifest = folder / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded.get("params") != params:
            raise ValueError(f"{folder} holds synthetic data for {recorded.get('params')}, not {params}")
        shards = [folder / name for name in recorded["shards"]]
        if all(p.is_file() for p in shards):
            return shards
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [
        (folder, split_name, k, range(start, min(start + samples_per_shard, num_samples)), height, width, seed)
        for k, start in enumerate(range(0, num_samples, samples_per_shard))
    ]
    progress = dict(total=len(jobs), desc=f"generating {split_name} shards", unit="shard")
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            shards = list(tqdm(pool.map(_write_shard, jobs), **progress))
    else:
        shards = [_write_shard(job) for job in tqdm(jobs, **progress)]
    tmp = manifest.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"params": params, "shards": [p.name for p in shards]}, indent=1))
    os.replace(tmp, manifest)  # the manifest appears last: its presence means the split is complete
    return shards


def ensure_synthetic(spec: SyntheticSpec, processes: int | None = None) -> dict[str, list[str]]:
    """Generate the train and val splits of `spec` unless complete; return their shard paths.

    `processes` (default: up to 8 of this machine's cores) render shards in parallel; scenes are seeded by index, so
    the shards are the same whatever the count.
    """
    root = spec.folder()
    counts = {"train": spec.num_train, "val": spec.num_val}
    processes = processes if processes is not None else min(8, os.cpu_count() or 1)
    return {
        split: [
            str(p)
            for p in generate_synthetic_shards(
                root / split,
                count,
                spec.height,
                spec.width,
                spec.seed,
                spec.samples_per_shard,
                split,
                processes=min(processes, -(-count // spec.samples_per_shard)),
            )
        ]
        for split, count in counts.items()
    }
