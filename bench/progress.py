"""A byte-counting progress bar on stderr: tqdm when installed, silence otherwise."""

from __future__ import annotations

import sys

try:
    from tqdm import tqdm
except ImportError:  # tqdm is an optional extra; the numbers do not depend on it
    tqdm = None


class Progress:
    """Advance by bytes moved; the description names the running case.

    Callers advance it between timed sections, never inside one, so drawing
    the bar costs the measurements nothing.
    """

    def __init__(self, total_bytes: int, *, enabled: bool = True, label: str = "bench") -> None:
        self._bar = None
        if enabled and tqdm is not None:
            self._bar = tqdm(
                total=total_bytes,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.25,
                # No rate: the limits and the kvstore cases move bytes at very different speeds.
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]",
            )

    def stage(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(text)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def quiet() -> Progress:
    """A progress object that draws nothing (for library callers and tests)."""
    return Progress(0, enabled=False)
