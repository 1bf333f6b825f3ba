"""Progress bars for long work, shown by one process only."""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm

# A terminal redraws the bar in place; elsewhere (a Ray worker's stderr, forwarded to the driver line by line,
# or a log file) every refresh is a line of its own, so one every this many seconds.
LINE_INTERVAL_S = 30.0


class _RefreshLines:
    """A stream that is no terminal: each refresh of the bar ends its own line. Written as tqdm writes it
    (a carriage return, then the bar), the next log line would be glued to the bar's last refresh."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, enabled: bool = True, stream: TextIO | None = None) -> tqdm:
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, desc=desc, disable=not enabled, file=stream, dynamic_ncols=True, mininterval=2.0)
    return tqdm(total=total, desc=desc, disable=not enabled, file=_RefreshLines(stream), ncols=100,
                mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S)
