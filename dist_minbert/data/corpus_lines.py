"""Corpus lines as both prepare engines judge and number them, so their shards are byte-identical."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dist_minbert.tasks.readers import BadRowError, Reject

_RAW_SHOWN = 200  # characters of a rejected line kept in rejects.tsv


@dataclass
class CorpusChunk:
    """Consecutive lines of a corpus: the good ones tokenized, the bad ones as rejects."""

    ids: pa.Array  # list<int32>, one entry per good line
    lines: np.ndarray  # int64, the good lines' 1-based numbers
    rejects: list[Reject]
    bytes_read: int  # input bytes these lines took, for the progress bar


def _check_line(body: bytes, max_line_bytes: int) -> tuple[str | None, tuple[str, str] | None]:
    """(text, None) for a usable line (its newline stripped), else (None, (reason, detail))."""
    if len(body) > max_line_bytes:
        return None, ("line_too_long", f"{len(body)} bytes, more than max_line_bytes={max_line_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, ("bad_utf8", str(exc))
    if not text.strip():
        return None, ("empty_text", "the line holds no text")
    return text, None


def _shown(body: bytes) -> str:
    """What rejects.tsv keeps of a bad line: its first characters, undecodable bytes escaped."""
    text = body[:_RAW_SHOWN].decode("utf-8", errors="backslashreplace")
    return text if len(body) <= _RAW_SHOWN else f"{text}..."


@dataclass
class JudgedLines:
    """A run of lines split into usable texts and rejects, by index within the run."""

    texts: list[str]
    good: list[int]  # index of each text
    bad: list[tuple[int, str, str, str]]  # (index, reason, detail, shown text)


def judge_lines(bodies: list[bytes], max_line_bytes: int) -> JudgedLines:
    judged = JudgedLines([], [], [])
    for index, body in enumerate(bodies):
        text, problem = _check_line(body, max_line_bytes)
        if problem is None:
            judged.texts.append(text)
            judged.good.append(index)
        else:
            judged.bad.append((index, *problem, _shown(body)))
    return judged


def chunk_of(judged: JudgedLines, ids: pa.Array, first_line: int, path: str, on_bad_row: str,
             bytes_read: int) -> CorpusChunk:
    """Numbers the run's lines from first_line; a bad line raises BadRowError under on_bad_row="error"."""
    if judged.bad and on_bad_row == "error":
        index, reason, detail, _ = judged.bad[0]
        raise BadRowError(path, first_line + index, reason, detail)
    rejects = [Reject(path, first_line + index, reason, raw) for index, reason, _, raw in judged.bad]
    return CorpusChunk(ids, first_line + np.asarray(judged.good, np.int64), rejects, bytes_read)
