"""A bulk ingest job: files read in parallel with sending, over several streams (spread over the
servers given, replicas of one store) with a bounded number of batches in flight each, retried
through server restarts (a broken stream moves to the next server), resumable by rerunning."""
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List

from .errors import ImagelshError
from .progress import Progress
from .retry import Backoff
from .source import PlannedItem
from .stream import END, Batch, BatchFeed, StreamCounters, pump, rotating_opener
from .models import IngestSummary, Refusal
from .v1 import imagelsh_pb2 as pb


@dataclass(frozen=True)
class IngestOptions:
    # Images per batch (at most the server's --max-batch-items).
    batch_size: int = 64
    # Image bytes per batch (well under the server's --max-message-bytes).
    max_batch_bytes: int = 4 << 20
    # Streams at once.
    parallel: int = 4
    # Unacknowledged batches per stream.
    max_in_flight: int = 4
    # Batches read from disk at once.
    readers: int = 2
    # Files larger than this are refused without being sent.
    max_item_bytes: int = 32 << 20
    backoff: Backoff = Backoff()
    progress: bool = True
    # After Ctrl-C, how long the batches in flight may take to be acknowledged.
    drain_seconds: float = 60.0

    def check(self):
        for name in ("batch_size", "max_batch_bytes", "parallel", "max_in_flight", "readers", "max_item_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.drain_seconds >= 0:
            raise ValueError("drain_seconds must be at least 0")


class IngestJob:
    def __init__(self, stubs, metadata, index: str, items: List[PlannedItem], options: IngestOptions,
                 summary: IngestSummary):
        options.check()
        # One stub per server (replicas of one store); a single stub is taken as a list of one.
        self._stubs = list(stubs) if isinstance(stubs, (list, tuple)) else [stubs]
        self._metadata, self._index = metadata, index
        self._items, self._options, self.summary = items, options, summary
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Set by Ctrl-C: no new batches are read or sent; those in flight finish.
        self._draining = threading.Event()
        self._calls = set()
        self._counters = StreamCounters()
        self._queue = queue.Queue(maxsize=options.parallel * options.max_in_flight)
        self._feed = BatchFeed(self._queue)
        self._progress = Progress(len(items), options.progress)
        self._errors = []

    def run(self):
        """Runs to the end. On Ctrl-C it stops taking new batches and waits for those in flight
        to be acknowledged (a second Ctrl-C, or `drain_seconds`, cancels them), so the summary
        is exact: what it counts as indexed is what the server holds. On any other error it
        stops the streams at once. Either way what was not acknowledged is counted as
        remaining, the summary is attached to the exception, and it is re-raised."""
        started = time.monotonic()
        threads = [threading.Thread(target=self._guard, args=(self._produce,), daemon=True)]
        threads += [threading.Thread(target=self._guard, args=(lambda n=n: self._stream(n),), daemon=True)
                    for n in range(self._options.parallel)]
        try:
            for thread in threads:
                thread.start()
            _join(threads)
        except KeyboardInterrupt as interrupted:
            self._drain(threads)
            interrupted.summary = self.summary
            raise
        except BaseException as failed:
            self._halt()
            for thread in threads:
                thread.join()
            failed.summary = self.summary
            raise
        finally:
            self._progress.close()
            with self._lock:
                self.summary.retries += self._counters.retries
                self.summary.seconds += time.monotonic() - started
                done = self.summary.indexed + self.summary.skipped + len(self.summary.refused)
                self.summary.remaining = len(self._items) + self.summary.skipped - done
        if self._errors:
            error = self._errors[0]
            error.summary = self.summary
            raise error

    def _guard(self, work):
        try:
            work()
        except BaseException as error:  # noqa: B902 - handed to the caller's thread
            with self._lock:
                self._errors.append(error if isinstance(error, Exception) else ImagelshError(repr(error)))
            self._halt()

    def _drain(self, threads):
        """Lets the streams finish the batches in flight, then stops everything."""
        self._draining.set()
        self._feed.close()
        self._progress.note("interrupted: waiting for the batches in flight (Ctrl-C again to cancel them)")
        try:
            _join(threads, time.monotonic() + self._options.drain_seconds)
        except KeyboardInterrupt:
            pass
        self._halt()
        for thread in threads:
            thread.join()

    def _halt(self):
        self._stop.set()
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel()

    def _refuse(self, refusals: List[Refusal]):
        with self._lock:
            self.summary.refused.extend(refusals)
        self._progress.advance(0, len(refusals))

    def _produce(self):
        """Groups the items into batches by count and bytes, reads them `readers` at a time
        (a bounded few ahead), and queues them in order for the streams."""
        options = self._options
        with ThreadPoolExecutor(options.readers) as pool:
            reading = []
            for batch_id, group in enumerate(self._groups()):
                if self._stop.is_set() or self._draining.is_set():
                    return
                reading.append(pool.submit(self._read, batch_id, group))
                if len(reading) >= 2 * options.readers:
                    self._put(reading.pop(0).result())
            for future in reading:
                self._put(future.result())
        self._put(END)

    def _groups(self):
        options = self._options
        group, group_bytes = [], 0
        for item in self._items:
            try:
                size = os.path.getsize(item.path)
            except OSError as error:
                self._refuse([Refusal(item.id, item.path, f"unreadable: {error.strerror or error}")])
                continue
            if size > options.max_item_bytes:
                self._refuse([Refusal(item.id, item.path, f"{size} bytes, over the {options.max_item_bytes} allowed")])
                continue
            if group and (len(group) >= options.batch_size or group_bytes + size > options.max_batch_bytes):
                yield group
                group, group_bytes = [], 0
            group.append(item)
            group_bytes += size
        if group:
            yield group

    def _read(self, batch_id: int, group: List[PlannedItem]):
        sent, messages, refused = [], [], []
        for item in group:
            try:
                with open(item.path, "rb") as file:
                    image = file.read(self._options.max_item_bytes + 1)
            except OSError as error:
                refused.append(Refusal(item.id, item.path, f"unreadable: {error.strerror or error}"))
                continue
            if len(image) > self._options.max_item_bytes:
                refused.append(Refusal(item.id, item.path, "grew over the size allowed while being read"))
                continue
            sent.append(item)
            messages.append(pb.Item(id=item.id, label=item.label, metadata=item.metadata, image=image))
        if refused:
            self._refuse(refused)
        if not messages:
            return None
        request = pb.IngestRequest(index=self._index, batch_id=batch_id, items=messages)
        return Batch(batch_id, request, sent)

    def _put(self, batch):
        if batch is None:
            return
        while not (self._stop.is_set() or self._draining.is_set()):
            try:
                self._queue.put(batch, timeout=_JOIN_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def _stream(self, n: int):
        """Stream `n`: opens on server n (mod their number), and after each break on the next
        one; what it had not got acknowledged goes back to the feed, sent again first."""
        pump(rotating_opener(self._stubs, "Ingest", self._metadata, first=n), self._feed,
             self._options.max_in_flight, self._acknowledged, self._options.backoff, self._stop,
             self._counters, self._lock, self._calls)

    def _acknowledged(self, batch: Batch, response):
        items = batch.payload
        refused = []
        for error in response.errors:
            item = items[error.position] if error.position < len(items) else None
            refused.append(Refusal(error.id, item.path if item is not None else "", error.message))
        with self._lock:
            self.summary.indexed += response.indexed
            self.summary.refused.extend(refused)
        self._progress.advance(response.indexed, len(refused))


_JOIN_POLL_SECONDS = 0.2


def _join(threads, deadline=None):
    """Waits for the threads in short steps (so that Ctrl-C reaches the caller at once), at
    most until `deadline` (time.monotonic())."""
    for thread in threads:
        while thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return
            thread.join(_JOIN_POLL_SECONDS)
