"""Byte-level text corpus for the language-model benchmark (``foof bench --suite lm``).

The corpus is ``python-docs-3.11.txt.gz``: the reStructuredText sources of the Python 3.11
documentation, one UTF-8 text of files each preceded by a line ``<<<FILE path>>>``. It is split
*by file* (every ``holdout``-th file, counted from 0, is validation), so no document is in both
sets, and read as bytes: a vocabulary of 256 tokens, no tokenizer to ship.

Where the file is looked for: ``data_dir`` (``--data-dir``), else ``$FOOF_DATA``, else the user
cache (:func:`foof.data.common.search_dirs`); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from foof.data.common import search_dirs

CORPUS_FILE = "python-docs-3.11.txt.gz"
VOCAB_SIZE = 256
_SEPARATOR = re.compile(rb"^<<<FILE (.+)>>>\n", re.MULTILINE)


@dataclass(frozen=True)
class TextSplit:
    """A corpus split by file into training and validation byte streams.

    Attributes:
        train: ``(N_train,)`` uint8, the training files concatenated.
        val: ``(N_val,)`` uint8, the held-out files concatenated.
        train_files: number of training files.
        val_files: number of validation files.
        path: the file read.
    """

    train: Tensor
    val: Tensor
    train_files: int
    val_files: int
    path: str


def find_corpus(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The corpus file in the first search directory that has it.

    Raises:
        FileNotFoundError: with the directories searched and how to point foof at the file.
    """
    dirs = search_dirs(data_dir)
    for directory in dirs:
        path = directory / CORPUS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{CORPUS_FILE} not found in {', '.join(str(d) for d in dirs)}. Put the file in one of "
        "them, set FOOF_DATA to the directory that holds it, or pass --data-dir DIR"
    )


def split_files(text: bytes) -> list[bytes]:
    """The files of a ``<<<FILE path>>>``-separated corpus, separator lines removed."""
    starts = [m for m in _SEPARATOR.finditer(text)]
    if not starts:
        return [text] if text else []
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return [text[m.end() : end] for m, end in zip(starts, ends)]


def load_text_corpus(
    data_dir: str | os.PathLike[str] | None = None, holdout: int = 10, max_bytes: int | None = None
) -> TextSplit:
    """Read the corpus as bytes and split it by file.

    Args:
        data_dir: directory searched first (else ``$FOOF_DATA``, then the user cache).
        holdout: every ``holdout``-th file (indices ``0, holdout, 2·holdout, ...``) is validation.
        max_bytes: keep at most this many bytes of each split (a tiny slice for quick runs).

    Returns:
        The :class:`TextSplit`.
    """
    if holdout < 2:
        raise ValueError(f"holdout must be >= 2, got {holdout!r}")
    path = find_corpus(data_dir)
    with gzip.open(path, "rb") as handle:
        files = split_files(handle.read())
    val = [f for i, f in enumerate(files) if i % holdout == 0]
    train = [f for i, f in enumerate(files) if i % holdout != 0]

    def stream(parts: list[bytes]) -> Tensor:
        data = b"".join(parts)
        if max_bytes is not None:
            data = data[:max_bytes]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    return TextSplit(stream(train), stream(val), len(train), len(val), str(path))


def random_windows(
    data: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A batch of random windows: inputs ``(B, T)`` and next-byte targets ``(B, T)``, int64."""
    starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
    offsets = torch.arange(context + 1)
    windows = data[starts[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]
