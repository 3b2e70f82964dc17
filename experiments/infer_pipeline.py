"""The moving parts of `experiments.infer`: images decoded ahead in DataLoader workers, grouped into batches of
one size, and predictions written by a background thread.

- `ImageReader` yields every image as `Decoded(index, image, reason)`, in input order, decoded in worker
  processes (`workers` > 0, prefetched) or in the calling process (0). A file that cannot be read comes back
  with `image=None` and the reason: a worker never fails the run on a bad file. If the worker machinery itself
  fails (a worker killed, out of shared memory), the remaining images are read in this process, with a warning.
- `equal_size_batches` groups consecutive images of one input size (hence one processing size) into batches of
  at most `batch_size`; unreadable files are passed to a callback as they come. The order is the input order.
- `OutputWriter` writes predictions in background threads behind a bounded queue (PNG encoding releases the
  GIL, so threads write in parallel); write errors are reported per image, and any other exception of a write (a
  KeyboardInterrupt, a bug) is raised in the calling thread by the next `put` or by `close`, which waits for the
  queue to drain (or drops what is still queued with `discard`).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_modules.image_io import read_image


class Decoded(NamedTuple):
    """One input: its position in the input list, the RGB image [3,H,W] in [0,1] or None, and why it is None."""

    index: int
    image: Tensor | None
    reason: str | None = None


def default_workers() -> int:
    """min(4, usable CPUs - 1): decoding keeps up with a GPU with a few workers and leaves a core to the model."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def decode(index: int, path: str | Path) -> Decoded:
    """Read one image; any failure of the decoder is a reason, not an exception (this runs in workers too)."""
    try:
        return Decoded(index, read_image(path))
    except Exception as error:  # any decoder failure means the same thing: this file cannot be used
        return Decoded(index, None, f"unreadable: {error}")


class ImageFiles(Dataset):
    """The images of a run, read by index (picklable: paths only, for any multiprocessing start method)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        return decode(index, self.paths[index])


def _as_is(item: Decoded) -> Decoded:
    return item


def _ignore_sigint(worker_id: int) -> None:
    """Ctrl-C is the main process's to handle: it shuts the workers down (and no worker prints a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start_method() -> str | None:
    # fork on Linux: workers start in milliseconds, with the model already loaded (copy-on-write, never touched)
    return "fork" if sys.platform.startswith("linux") else None


class ImageReader:
    """Every image of `paths` as `Decoded`, in order; `workers` > 0 processes decode them ahead of use.

    Create it before starting other threads (the workers are forked here), iterate it once, then `close` it
    (also on Ctrl-C: it shuts the workers down). `prefetch` images in all are decoded ahead (at least 2 per
    worker). `warn` receives the messages of a fallback to reading in this process.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        workers: int,
        prefetch: int = 8,
        pin_memory: bool = False,
        warn: Callable[[str], None] = print,
    ) -> None:
        self.paths = list(paths)
        self.workers = min(workers, len(self.paths)) if len(self.paths) > 1 else 0
        self._warn = warn
        self._next = 0  # index of the first image not yet yielded
        self._iterator: Any = None
        self._restore_sigchld: contextlib.ExitStack | None = None
        if self.workers:
            loader = DataLoader(
                ImageFiles(self.paths),
                batch_size=None,
                num_workers=self.workers,
                collate_fn=_as_is,
                pin_memory=pin_memory,
                prefetch_factor=max(2, math.ceil(prefetch / self.workers)),
                worker_init_fn=_ignore_sigint,
                multiprocessing_context=_start_method(),
            )
            try:
                self._iterator = iter(loader)
            except (OSError, RuntimeError) as error:  # cannot fork, no shared memory, ...
                self._fall_back(error)
            else:
                self._restore_sigchld = contextlib.ExitStack()
                self._restore_sigchld.enter_context(_worker_deaths_raised_by_the_loader())

    def __iter__(self) -> Iterator[Decoded]:
        if self._iterator is not None:
            try:
                for item in self._iterator:
                    self._next = item.index + 1
                    yield item
            except RuntimeError as error:  # the loader's own failure: files' errors come back as reasons
                self._shutdown()
                self._fall_back(error)
            else:
                self._shutdown()
        for index in range(self._next, len(self.paths)):
            self._next = index + 1
            yield decode(index, self.paths[index])

    def _fall_back(self, error: BaseException) -> None:
        remaining = len(self.paths) - self._next
        self._warn(
            f"warning: the image-reading worker processes failed ({type(error).__name__}: {error}); reading the "
            f"remaining {remaining} images in the main process"
        )
        self.workers = 0

    def _shutdown(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if self._restore_sigchld is not None:
            self._restore_sigchld.close()
            self._restore_sigchld = None

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._shutdown()


@contextlib.contextmanager
def _worker_deaths_raised_by_the_loader() -> Iterator[None]:
    """While active, a dead worker is reported only by the loader's `next()` (after its status check interval),
    where `ImageReader` handles it: torch's SIGCHLD handler would raise it in the main thread wherever that is
    (inside a prediction or a print), as an error of that code."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        yield
        return
    previous = signal.getsignal(signal.SIGCHLD)
    if not callable(previous):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            previous(signum, frame)
        except RuntimeError:
            pass  # raised again, synchronously, by the loader's next()

    signal.signal(signal.SIGCHLD, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def equal_size_batches(
    items: Iterable[Decoded], batch_size: int, unreadable: Callable[[int, str], None]
) -> Iterator[list[Decoded]]:
    """Consecutive readable images of one size, at most `batch_size` at a time, in order.

    Images of one input size have one processing size, so `predictor.predict` takes each batch as it is. A batch
    is yielded as soon as it is full (it never waits for the next image), or when the next image's size differs,
    or at the end. `unreadable(index, reason)` is called for each unreadable file when it comes (it does not
    split a batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Decoded] = []
    for item in items:
        if item.image is None:
            unreadable(item.index, item.reason or "unreadable")
            continue
        if batch and batch[0].image.shape != item.image.shape:
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


WRITE_ERRORS = (RuntimeError, OSError, ValueError)  # a full disk, a permission, a value the writer refuses


class OutputWriter:
    """Calls `write(stem, prediction, uncertainty)` in `threads` background threads for each `put` (in order with
    one thread; with more, several predictions are written at once).

    At most `capacity` predictions wait in the queue (`put` blocks while it is full), so memory stays bounded.
    After each write, `written(key)` is called, or `failed(key, error)` for a `WRITE_ERRORS` error (the next
    prediction is written anyway); both run in a writer thread, one call at a time. Any other exception of a write
    (a KeyboardInterrupt, a bug) stops the writing: what is being written by the other threads is finished, the
    rest is dropped, and the exception is raised in the calling thread by the next `put` or by `close`.
    """

    def __init__(
        self,
        write: Callable[[Path, Tensor, Tensor | None], object],
        capacity: int,
        written: Callable[[Any], None],
        failed: Callable[[Any, BaseException], None],
        threads: int = 1,
    ) -> None:
        if threads < 1 or capacity < 1:
            raise ValueError(f"threads and capacity must be >= 1, got {threads} and {capacity}")
        self._write, self._written, self._failed = write, written, failed
        self._queue: queue.Queue[tuple[Any, Path, Tensor, Tensor | None] | None] = queue.Queue(maxsize=capacity)
        self._report = threading.Lock()  # `written` and `failed` one at a time (they count)
        self._error: BaseException | None = None
        self._discard = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"infer-writer-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, key: Any, stem: Path, prediction: Tensor, uncertainty: Tensor | None) -> None:
        self._raise_error()
        self._queue.put((key, stem, prediction, uncertainty))

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is not None or self._discard:
                    continue  # dropped: never written, so never counted
                key, stem, prediction, uncertainty = job
                try:
                    self._write(stem, prediction, uncertainty)
                except WRITE_ERRORS as error:
                    with self._report:
                        self._failed(key, error)
                else:
                    with self._report:
                        self._written(key)
            except BaseException as error:  # noqa: BLE001 - handed to the calling thread, which raises it
                if self._error is None:
                    self._error = error
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            self._discard = True  # first: what is still queued stays unwritten
            error, self._error = self._error, None
            raise error

    def close(self, discard: bool = False) -> None:
        """Wait until everything queued is written (with `discard`, or on a second Ctrl-C while waiting, only the
        prediction being written is finished and the queued ones are dropped), then raise a write's exception."""
        if not any(thread.is_alive() for thread in self._threads):
            self._raise_error()
            return
        self._discard = self._discard or discard
        try:
            self._stop()
        except KeyboardInterrupt:  # Ctrl-C again: finish what is being written, drop the rest
            self._discard = True
            self._stop()
            raise
        self._raise_error()

    def _stop(self) -> None:
        for _ in self._threads:  # one end mark per thread, behind what is queued
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
