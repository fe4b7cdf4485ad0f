"""Progress of a bulk job: a tqdm bar on a terminal (when tqdm is installed), else a plain line
on stderr every few seconds."""
import sys
import threading
import time

_LINE_EVERY_SECONDS = 5.0


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.done = self.refused = 0
        self._start = self._last_line = time.monotonic()
        self._bar = None
        # Streams and readers report from their own threads.
        self._lock = threading.Lock()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def advance(self, indexed: int, refused: int):
        with self._lock:
            self._advance(indexed, refused)

    def _advance(self, indexed: int, refused: int):
        self.done += indexed + refused
        self.refused += refused
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(indexed + refused)
            self._bar.set_postfix(refused=self.refused, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= _LINE_EVERY_SECONDS:
            self._last_line = now
            print(self._line(now), file=sys.stderr, flush=True)

    def _line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f} s" if eta != float("inf") else "?"
        return (f"imagelsh: {self.done}/{self.total} items, {rate:.1f}/s, "
                f"refused {self.refused}, ETA {eta_text}")

    def note(self, message: str):
        """A line for the person watching (above the bar on a terminal)."""
        if not self.enabled:
            return
        with self._lock:
            if self._bar is not None:
                self._bar.write(f"imagelsh: {message}", file=sys.stderr)
            else:
                print(f"imagelsh: {message}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(self._line(time.monotonic()), file=sys.stderr, flush=True)
