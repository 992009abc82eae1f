"""What a long command shows while it works: redrawn in place on a terminal, sparse lines in a batch log.

A Slurm job's output is a file: a line per file scanned (or a progress bar's carriage returns) would
bury its log. So on a terminal a `Ticker` redraws one line in place and a `Screen` redraws a whole
report in place; elsewhere a `Ticker` prints a line every `log_every` seconds at most (or nothing), and a
`Screen` prints each report in full, separated by a blank line. Light on purpose (no third-party import).
"""

import sys
import time

ERASE_LINE = "\033[K"  # erase from the cursor to the end of the line
HOME = "\033[H"  # cursor to the top left corner
ERASE_BELOW = "\033[J"  # erase from the cursor to the end of the screen
CLEAR = "\033[2J"


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Ticker:
    """One progress line. `update(text)` redraws it in place on a terminal (at most every `tty_every`
    seconds); off a terminal it prints `text` as a new line at most every `log_every` seconds, never when
    `log_every` is None. `close(text)` ends it: the final text stays on its own line wherever it goes."""

    def __init__(self, stream=None, tty_every: float = 0.2, log_every: float | None = None, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = is_terminal(self.stream)
        self.every = tty_every if self.tty else log_every
        self.clock = clock
        self._last: float | None = None
        self._drawn = False

    def update(self, text: str) -> None:
        if self.every is None:
            return
        now = self.clock()
        if self._last is not None and now - self._last < self.every:
            return
        self._last = now
        self._write(text)

    def close(self, text: str | None = None) -> None:
        if text is not None and (self.tty or self.every is not None):
            self._write(text)
        if self._drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    def _write(self, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r{text}{ERASE_LINE}")
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class Counter:
    """`progress(done, total)` for a long operation (scan, rebuild, verify): `<label> 120/400 (30%)` in
    place on a terminal, nothing elsewhere. Call `close()` when done."""

    def __init__(self, label: str, stream=None, clock=time.monotonic):
        self.label = label
        self.ticker = Ticker(stream, clock=clock)
        self._shown = None

    def __call__(self, done: int, total: int) -> None:
        self._shown = f"{self.label} {done}/{total}" + (f" ({100 * done // total}%)" if total else "")
        self.ticker.update(self._shown)

    def close(self) -> None:
        self.ticker.close(self._shown if self.ticker._drawn else None)


class Screen:
    """A report shown again and again (`status --watch`): redrawn in place on a terminal (cursor home,
    each line erased to its end, the rest of the screen erased: no scrolling, no flicker); elsewhere each
    report is printed whole, separated from the previous one by a blank line."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = is_terminal(self.stream)
        self._frames = 0

    def show(self, text: str) -> None:
        if self.tty:
            lines = text.split("\n")
            self.stream.write((CLEAR if self._frames == 0 else "") + HOME
                              + "".join(f"{line}{ERASE_LINE}\n" for line in lines) + ERASE_BELOW)
        else:
            self.stream.write(("\n" if self._frames else "") + text + "\n")
        self.stream.flush()
        self._frames += 1
