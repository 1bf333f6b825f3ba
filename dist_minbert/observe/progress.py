"""Progress bars for long work, shown by one process only."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=2.0)
