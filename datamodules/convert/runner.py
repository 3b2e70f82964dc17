"""Run one converter: deterministic inputs -> shards, worker processes, progress, resume and a skip report.

Inputs are sorted by sample key and shard k holds inputs[k * shard_size : (k + 1) * shard_size], so the same raw
folder, split list, options and shard size always map every input to the same shard. `.convert/plan.json`
records that mapping (a hash of the ordered keys); a rerun with a different plan stops with an error instead of
mixing two mappings. A shard that exists under its final name is complete and is skipped; each shard is written
under `<name>.tar.tmp` and renamed when whole. Per-shard records (`.convert/<shard>.json`, written just before
the rename) keep the skipped inputs, so `skipped.json` and `manifest.json`, written at the end, cover shards
finished by earlier runs too. A shard whose inputs were all skipped is written empty, so resume stays exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datamodules.convert.common import SkipInput
from datamodules.shard_writer import AtomicShardWriter

STATE_DIR = ".convert"


@dataclass(frozen=True)
class Input:
    """One raw sample: its shard key, the raw files by role (absolute paths) and per-input facts."""

    key: str
    paths: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


def provenance(item: Input) -> dict[str, str]:
    """The input's existing raw files, relative to its dataset root (`info["root"]`), for the metadata."""
    root = item.info.get("root", "/")
    return {role: os.path.relpath(path, root) for role, path in item.paths.items() if Path(path).is_file()}


@dataclass(frozen=True)
class Skip:
    """An input that produced no sample, and why."""

    key: str
    reason: str
    paths: dict[str, str] = field(default_factory=dict)


Lister = Callable[[Path, "Path | None", dict[str, Any]], tuple[list[Input], list[Skip]]]
Converter = Callable[[Input, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Dataset:
    """A converter: lists the raw inputs and turns one input into encoded shard members."""

    name: str
    prefix: str
    shard_size: int
    list_inputs: Lister
    convert: Converter
    summary: str
    add_arguments: Callable[[Any], None] | None = None
    layout: str = ""  # the raw files expected under --src, printed when none are found


@dataclass
class Report:
    """What a run produced: every shard, the written count and every skipped input."""

    shards: list[Path]
    written: int
    skipped: list[Skip]


def _convert_one(task: tuple[Converter, Input, dict[str, Any]]) -> tuple[dict[str, Any] | None, Skip | None]:
    convert, item, options = task
    try:
        return convert(item, options), None
    except SkipInput as err:
        return None, Skip(item.key, str(err), item.paths)
    except Exception as err:  # a corrupt or unexpected input must not stop the other inputs
        return None, Skip(item.key, f"{type(err).__name__}: {err}", item.paths)


def _ignore_interrupts() -> None:
    """Worker processes leave Ctrl-C to the main process, which reports it once and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ordered(tasks: list[Any], workers: int) -> Iterator[tuple[dict[str, Any] | None, Skip | None]]:
    """Results in task order; at most 2 x workers samples in flight so large samples do not pile up."""
    if workers <= 1:
        yield from map(_convert_one, tasks)
        return
    with ProcessPoolExecutor(workers, initializer=_ignore_interrupts) as pool:
        window: deque[Future] = deque()
        pending = iter(tasks)
        for task in pending:
            window.append(pool.submit(_convert_one, task))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _write_json(path: Path, content: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


def _plan(dataset: Dataset, inputs: list[Input], shard_size: int, prefix: str, options: dict[str, Any]) -> dict:
    digest = hashlib.sha1("\n".join(i.key for i in inputs).encode()).hexdigest()
    return dict(
        dataset=dataset.name, prefix=prefix, shard_size=shard_size, inputs=len(inputs), keys_sha1=digest,
        options=json.loads(json.dumps(options, sort_keys=True, default=str)),
    )  # fmt: skip


def run_conversion(
    dataset: Dataset,
    src: str | Path,
    out: str | Path,
    split_list: str | Path | None = None,
    workers: int = 1,
    shard_size: int | None = None,
    prefix: str | None = None,
    options: dict[str, Any] | None = None,
    progress: bool = True,
) -> Report:
    """Convert the raw dataset under `src` into shards in `out`; resume an interrupted run; report skips."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    expected = f"; expected under --src: {dataset.layout}" if dataset.layout else ""
    if not src.is_dir():
        raise FileNotFoundError(f"raw {dataset.name} folder not found: {src}{expected}")
    if split_list is not None and not Path(split_list).is_file():
        raise FileNotFoundError(f"split list not found: {split_list}")
    shard_size, prefix, options = shard_size or dataset.shard_size, prefix or dataset.prefix, dict(options or {})
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    inputs, listing_skips = dataset.list_inputs(src, Path(split_list) if split_list else None, options)
    inputs = sorted(inputs, key=lambda i: i.key)
    duplicates = [k for k, n in Counter(i.key for i in inputs).items() if n > 1]
    if duplicates:
        raise ValueError(f"{dataset.name}: duplicate sample keys {duplicates[:5]}")
    if not inputs:
        raise ValueError(
            f"{dataset.name}: no inputs found under {src} ({len(listing_skips)} skipped while listing){expected}"
        )

    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    plan = _plan(dataset, inputs, shard_size, prefix, options)
    plan_path = state / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != plan:
        raise ValueError(
            f"{out} holds a conversion with another plan ({plan_path}): different inputs, options or shard size. "
            "Use a new output folder (or delete the old one) to convert these inputs."
        )
    _write_json(plan_path, plan)

    writer = AtomicShardWriter(out, prefix)
    chunks = [inputs[start : start + shard_size] for start in range(0, len(inputs), shard_size)]
    todo = [k for k in range(len(chunks)) if not writer.path(k).is_file()]
    tasks = [(dataset.convert, item, options) for k in todo for item in chunks[k]]
    bar = tqdm(
        total=len(inputs), initial=len(inputs) - len(tasks), unit="sample", desc=f"converting {dataset.name}",
        disable=not progress,
    )  # fmt: skip
    results = _ordered(tasks, workers)
    try:
        for k in todo:
            writer.write(k, _shard_samples(chunks[k], results, state / f"{writer.path(k).stem}.json", bar))
    finally:
        results.close()  # shuts the worker pool down
        bar.close()
    return _finish(dataset, out, writer, len(chunks), inputs, listing_skips, plan)


def _shard_samples(
    chunk: list[Input], results: Iterator[tuple[dict[str, Any] | None, Skip | None]], record: Path, bar: tqdm
) -> Iterator[dict[str, Any]]:
    """Yield the shard's samples; its record is written after the last one, before the writer renames the shard."""
    skipped, written = [], 0
    for _ in chunk:
        members, skip = next(results)
        bar.update()
        if skip is not None:
            skipped.append(asdict(skip))
            continue
        written += 1
        yield members
    _write_json(record, {"written": written, "skipped": skipped})


def _finish(
    dataset: Dataset, out: Path, writer: AtomicShardWriter, n_shards: int, inputs: list[Input],
    listing_skips: list[Skip], plan: dict,
) -> Report:  # fmt: skip
    shards = [writer.path(k) for k in range(n_shards)]
    skipped, written, per_shard, unknown = list(listing_skips), 0, [], []
    for shard in shards:
        record = out / STATE_DIR / f"{shard.stem}.json"
        if not record.is_file():
            unknown.append(shard.name)
            per_shard.append(None)
            continue
        content = json.loads(record.read_text())
        skipped += [Skip(**s) for s in content["skipped"]]
        written += content["written"]
        per_shard.append(content["written"])
    _write_json(out / "skipped.json", [asdict(s) for s in skipped])
    manifest = dict(
        plan, written=written, skipped=len(skipped), shards=[s.name for s in shards], samples_per_shard=per_shard,
        shards_without_record=unknown,
    )  # fmt: skip
    _write_json(out / "manifest.json", manifest)
    _print_summary(dataset, out, written, skipped, unknown)
    return Report(shards, written, skipped)


def _print_summary(dataset: Dataset, out: Path, written: int, skipped: list[Skip], unknown: list[str]) -> None:
    print(f"{dataset.name}: {written} samples written to {out}, {len(skipped)} inputs skipped")
    for skip in skipped[:20]:
        print(f"  skipped {skip.key}: {skip.reason}")
    if len(skipped) > 20:
        print(f"  ... {len(skipped) - 20} more in {out / 'skipped.json'}")
    if unknown:
        print(f"  {len(unknown)} finished shards have no record in {out / STATE_DIR} (their skips are unknown)")
