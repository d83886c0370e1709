"""Console output shared by the loops: the examples' periodic lines, plus a bar on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Progress:
    """Iterate with a tqdm bar when stderr is a terminal; print lines without breaking the bar."""

    def __init__(self, iterable: Iterable[T], total: int, desc: str, unit: str = "batch"):
        self.bar = tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not sys.stderr.isatty())

    def __iter__(self) -> Iterator[T]:
        return iter(self.bar)

    def print(self, line: str) -> None:
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
