"""Sends batches over bidirectional streams with a bounded number unacknowledged per stream, and
resends the unacknowledged ones, on a new stream, after a transient failure (the server's
responses come one per request, in order, so the oldest batch sent is the one acknowledged)."""
import collections
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import grpc

from .errors import ImagelshError, Unavailable, from_rpc_error
from .retry import Backoff, is_retryable

# How often a blocked sender or reader looks whether it should stop, seconds.
_POLL_SECONDS = 0.1


@dataclass
class Batch:
    """One request and what the caller needs to make sense of its response."""

    batch_id: int
    request: Any
    # The caller's own record of what the request carries (items, positions).
    payload: Any


class _End:
    """Put on the queue after the last batch."""


END = _End()


class BatchFeed:
    """The batches a job sends, shared by its streams: those a failed stream handed back first
    (any stream may resend them), then new ones from `source`, a bounded queue ended by END."""

    def __init__(self, source: "queue.Queue"):
        self._source = source
        self._returned = collections.deque()
        self._lock = threading.Lock()
        self._exhausted = False
        self._closed = False

    def close(self):
        """No more batches are given out (a job draining after Ctrl-C): streams finish what
        they have in flight and end."""
        with self._lock:
            self._closed = True

    def take(self, should_stop: Callable[[], bool]) -> Optional[Batch]:
        """The next batch, or None when there are no more (or `should_stop` says so)."""
        while True:
            with self._lock:
                if self._closed:
                    return None
                if self._returned:
                    return self._returned.popleft()
                if self._exhausted:
                    return None
            if should_stop():
                return None
            try:
                batch = self._source.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if batch is END:
                with self._lock:
                    self._exhausted = True
                continue
            with self._lock:
                if self._closed:
                    # Taken from the source after the close: never sent, so never counted.
                    self._returned.appendleft(batch)
                    return None
            return batch

    def hand_back(self, batches: List[Batch]):
        """Batches sent but never acknowledged: they go out again first, oldest first."""
        with self._lock:
            self._returned.extendleft(reversed(batches))

    def pending(self) -> List[Batch]:
        """The batches handed back and not taken again (what an interrupted job left)."""
        with self._lock:
            return list(self._returned)


class _Attempt:
    """One stream: what it sent that is not acknowledged yet, and its window."""

    def __init__(self, window: int):
        self._window = threading.Semaphore(window)
        self._lock = threading.Lock()
        self._sent = collections.deque()
        self._closed = False
        self.call = None

    def requests(self, feed: BatchFeed, stop: threading.Event):
        should_stop = lambda: self._closed or stop.is_set()  # noqa: E731
        while True:
            while not self._window.acquire(timeout=_POLL_SECONDS):
                if should_stop():
                    return
            if should_stop():
                return
            batch = feed.take(should_stop)
            if batch is None:
                return
            with self._lock:
                if self._closed:
                    feed.hand_back([batch])
                    return
                self._sent.append(batch)
            yield batch.request

    def acknowledged(self, response_batch_id: int) -> Batch:
        with self._lock:
            if not self._sent:
                raise ImagelshError(f"the server acknowledged batch {response_batch_id}, which was not sent")
            batch = self._sent.popleft()
        if batch.batch_id != response_batch_id:
            raise ImagelshError(f"the server acknowledged batch {response_batch_id} where {batch.batch_id} was due")
        self._window.release()
        return batch

    def close(self) -> List[Batch]:
        """Ends the stream's sending; returns what it sent that was never acknowledged."""
        with self._lock:
            self._closed = True
            leftover = list(self._sent)
            self._sent.clear()
            return leftover


def rotating_opener(stubs: Sequence[Any], method: str, metadata, first: int = 0) -> Callable:
    """An `open_call` for `pump` over replicas: the first stream opens on server `first` (mod
    their number), each one after it (a retry) on the next server."""
    opened = itertools.count(first)

    def open_call(requests):
        return getattr(stubs[next(opened) % len(stubs)], method)(requests, metadata=metadata)

    return open_call


@dataclass
class StreamCounters:
    retries: int = 0


def pump(open_call: Callable, feed: BatchFeed, window: int, on_response: Callable[[Batch, Any], None],
         backoff: Backoff, stop: threading.Event, counters: StreamCounters, lock: threading.Lock,
         calls: set):
    """Sends the feed's batches over streams that `open_call(request_iterator)` opens, until the
    feed is exhausted and everything sent is acknowledged, or `stop` is set. Retries transient
    failures (up to `backoff.retries` in a row without an acknowledgement); raises the client's
    error for any other failure. `calls` holds the open calls, so that a stop can cancel them."""
    attempt = 0
    while not stop.is_set():
        state = _Attempt(window)
        call = open_call(state.requests(feed, stop))
        with lock:
            calls.add(call)
        try:
            for response in call:
                on_response(state.acknowledged(response.batch_id), response)
                attempt = 0
            leftover = state.close()
            if not leftover:
                return
            # The server ended the stream with batches unanswered (it is shutting down).
            feed.hand_back(leftover)
            error = None
        except grpc.RpcError as failure:
            feed.hand_back(state.close())
            if stop.is_set():
                return
            if not is_retryable(failure):
                raise from_rpc_error(failure) from None
            error = failure
        except BaseException:
            feed.hand_back(state.close())
            raise
        finally:
            with lock:
                calls.discard(call)
        if attempt >= backoff.retries:
            raise Unavailable(f"gave up after {attempt} retries in a row: "
                              f"{from_rpc_error(error) if error is not None else 'the server ended the stream'}",
                              error.code() if error is not None else None)
        with lock:
            counters.retries += 1
        stop.wait(backoff.delay_after(attempt, error) if error is not None else backoff.delay(attempt))
        attempt += 1
