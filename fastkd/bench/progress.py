"""Progress on stderr while the benchmark runs, one unit per (case, implementation).

A tqdm bar when tqdm is installed (the ``bench`` extra) and stderr is a terminal; on a terminal
without tqdm, a one-line counter redrawn in place; anywhere else (CI logs, pipes) plain lines,
each with its ``[done/total]`` count, since carriage returns would garble a log. Finished
implementations are always printed as a line of their own, with their time and peak memory.
"""
from __future__ import annotations

import sys


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done = total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = _isatty(self.stream)
        self.bar = None
        self._status = ""
        if enabled and self.tty:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=self.stream, unit="impl", leave=False,
                                dynamic_ncols=True)

    def start(self, what: str) -> None:
        """An implementation begins (shown on a terminal only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(what[:60], refresh=True)
        elif self.tty:
            self._status = f"[{self.done}/{self.total}] running {what}"
            self.stream.write("\r\033[K" + self._status)
            self.stream.flush()

    def finish(self, line: str, n: int = 1) -> None:
        """``n`` implementations are done; ``line`` says how they went."""
        self.done += n
        if not self.enabled:
            return
        text = f"[{self.done}/{self.total}] {line}"
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
            self.bar.update(n)
        elif self.tty:
            self.stream.write("\r\033[K" + text + "\n")
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty and self._status:
            self.stream.write("\r\033[K")
            self.stream.flush()


def describe_row(row: dict) -> str:
    """One finished implementation, as the progress line shows it."""
    head = f"{row['label']:<56} {row['display']:<15}"
    if row.get("error"):
        return f"{head} ERROR {row['error']}"
    peak = "n/a" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**20:,.0f} MiB"
    return f"{head} {row['median_s'] * 1e3:10.2f} ms  x{row['reps']:<3} peak {peak}"

