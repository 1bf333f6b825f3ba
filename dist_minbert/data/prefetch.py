"""Steps read and collated ahead of the training step, on a background thread (see step_reader for
why each step carries its own snapshot of the stream positions)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

P = TypeVar("P")
T = TypeVar("T")

_POLL_S = 0.1


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
