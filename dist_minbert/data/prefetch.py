"""Batches read and collated ahead of the training step, on a background thread.

Streams advance when a batch is read, which with prefetch is before the trainer uses
it; so each prefetched step carries a snapshot of the stream positions taken right
after it was read. A checkpoint stores the snapshot of the last step the trainer
consumed, never the streams' live state, and resuming from it repeats and skips nothing.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import pyarrow as pa

from dist_minbert.data.collate import Collated
from dist_minbert.data.stream import TaskStream

P = TypeVar("P")
T = TypeVar("T")

_POLL_S = 0.1


@dataclass
class StepBatches:
    batches: dict[str, Collated]  # task -> this rank's collated batch
    ids: dict[str, list[str]]  # task -> row ids of the batch (empty lists for sources without ids)
    stream_states: dict[str, dict[str, int]]  # every stream's position after this step: what a checkpoint stores


def read_step(
    streams: dict[str, TaskStream],
    plan: dict[str, int],
    collate_rows: Callable[[str, pa.Table], Collated],
) -> StepBatches:
    """This rank's batches of one step's plan (task -> global batch size), with the positions after it.

    `collate_rows(task, rows)` gets the rows as an Arrow table; collate() takes it as is."""
    batches, ids = {}, {}
    for task, global_batch_size in plan.items():
        rows = streams[task].next_table(global_batch_size)
        batches[task] = collate_rows(task, rows)
        ids[task] = rows.column("id").to_pylist() if "id" in rows.column_names else []
    return StepBatches(batches, ids, {task: stream.state_dict() for task, stream in streams.items()})


class Prefetcher(Generic[P, T]):
    """Yields produce(item) for each item of `plan`, in order, computed up to `depth` items ahead.

    depth 0 produces on the caller's thread. An exception in `produce` is raised by the
    next() that would have returned its item. Use as a context manager (or call close())
    so an abandoned iteration stops the thread.
    """

    def __init__(self, produce: Callable[[P], T], plan: Iterable[P], depth: int):
        if depth < 0:
            raise ValueError(f"prefetch: {depth} is negative; allowed: an integer >= 0")
        self._produce, self._plan = produce, iter(plan)
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = None
        self._done = False
        if depth:
            self._thread = threading.Thread(target=self._run, name="data-prefetch", daemon=True)
            self._thread.start()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._thread is None:
            return self._produce(next(self._plan))
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "item":
            return value
        self._done = True
        self._thread.join()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    pass
            self._done = True

    def __enter__(self) -> Prefetcher[P, T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        try:
            for item in self._plan:
                if not self._put(("item", self._produce(item))):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(("error", exc))

    def _put(self, message: tuple[str, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
