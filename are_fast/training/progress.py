"""Progress that reads well where it goes: a tqdm bar on a terminal, elsewhere one plain line every N seconds.

A bar redraws itself many times a second; written to a file or a CI log, each redraw becomes text (115 KB for
the main job). Off a terminal, ``Progress`` instead prints at most one line per ``interval_s`` seconds (or one
every ``interval_steps`` units), and one at the end:

    stage1: step 120/400 (30%) | loss 1.2340 | 5321 tokens/s | 0:01:02 elapsed | ETA 0:02:25
"""
from __future__ import annotations

import datetime
import sys
import time

from tqdm.auto import tqdm


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Progress of ``total`` units (``unit``: "step", "batch", ...), started at ``initial``.

    Args:
        desc: the line's prefix (the job's name).
        enabled: False prints nothing at all (``--no-progress``).
        interval_s: seconds between two plain lines (off a terminal).
        interval_steps: when > 0, a plain line every this many units instead (``--logging-steps``).
        stream: where it writes (default stderr, as tqdm); a bar only when it is a terminal.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0, interval_s: float = 30.0,
                 stream=None, unit: str = "step", interval_steps: int = 0):
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.interval_steps = interval_steps
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = self.initial = self.printed = initial
        self.values: dict = {}
        self.start = self.last_line = time.perf_counter()
        terminal = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream) if terminal else None

    def update(self, n: int = 1, **values) -> None:
        """``n`` more units done; ``values`` (loss=..., tokens_per_s=...) are shown with the count."""
        self.done += n
        self.values.update(values)
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix({k: _short(v) for k, v in self.values.items()}, refresh=False)
        elif self.enabled and (self.done % self.interval_steps == 0 if self.interval_steps else
                               time.perf_counter() - self.last_line >= self.interval_s):
            self._line()

    def line(self) -> str:
        """The plain progress line for the current state."""
        elapsed = time.perf_counter() - self.start
        parts = [f"{self.desc}: {self.unit} {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%)"]
        for key, value in self.values.items():
            parts.append(f"{key.replace('_per_s', '/s').replace('_', ' ')} {_short(value)}")
        parts.append(f"{_clock(elapsed)} elapsed")
        new = self.done - self.initial
        if 0 < new and self.done < self.total:
            parts.append(f"ETA {_clock(elapsed / new * (self.total - self.done))}")
        return " | ".join(parts)

    def _line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_line, self.printed = time.perf_counter(), self.done

    def write(self, text: str) -> None:
        """Print a message line (an evaluation's results) without breaking the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar, or print the last line (unless it shows nothing new)."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done != self.printed:
            self._line()


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
