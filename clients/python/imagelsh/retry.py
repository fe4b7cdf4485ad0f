"""When and how long the client waits before trying a call again: exponential backoff with
jitter, or the server's `retry-after` where it gives one (the same rules as `imagelsh ingest`)."""
import random
from dataclasses import dataclass
from typing import Optional

import grpc

# The server was away or shutting down (UNAVAILABLE, or CANCELLED when it reset the stream), or
# busy (RESOURCE_EXHAUSTED: its call, stream or model-queue limits). Everything else is the
# request's own fault, or a server fault that repeats.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})

# A retry-after longer than this is taken as this.
_LONGEST_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class Backoff:
    """The n-th retry waits a random time between half and all of `first × 2ⁿ`, capped at
    `max`; `retries` in a row without progress, and the job gives up. About 50 s in all by
    default: a server restart fits well inside."""

    first: float = 0.1
    max: float = 10.0
    retries: int = 10

    def delay(self, attempt: int, unit: Optional[float] = None) -> float:
        """The wait, seconds, before retry `attempt` (0 is the first); `unit` in [0, 1) is the jitter."""
        unit = random.random() if unit is None else min(max(unit, 0.0), 1.0)
        full = min(self.first * (2 ** min(attempt, 20)), self.max)
        return full * (0.5 + 0.5 * unit)

    def delay_after(self, attempt: int, error: grpc.RpcError) -> float:
        """The server's retry-after if it gave one (never more than `max`), else `delay`."""
        wait = retry_after(error)
        return min(wait, self.max) if wait is not None else self.delay(attempt)


def is_retryable(error: grpc.RpcError) -> bool:
    """Whether a call that failed with `error` may succeed if sent again."""
    return hasattr(error, "code") and error.code() in RETRYABLE


def retry_after(error: grpc.RpcError) -> Optional[float]:
    """The seconds a busy server asked the client to wait (its `retry-after` trailer), if any."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key.lower() != "retry-after":
            continue
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            return None
        return min(seconds, _LONGEST_RETRY_AFTER) if 0.0 <= seconds < float("inf") else None
    return None
