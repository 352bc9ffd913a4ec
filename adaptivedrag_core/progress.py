"""One progress hook for every long loop: ``progress(step, total)``.

The CLI passes a tqdm-backed callback, the ComfyUI nodes pass one that drives
``comfy.utils.ProgressBar`` (whose ``update`` also raises when the user presses Cancel).
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressFn = Optional[Callable[[int, int], None]]


def report(progress: ProgressFn, step: int, total: int) -> None:
    """Call ``progress(step, total)`` if a callback was given."""
    if progress is not None:
        progress(step, total)


class TqdmProgress:
    """A ``progress(step, total)`` callback that shows a tqdm bar labelled ``desc``."""

    def __init__(self, desc: str):
        self.desc = desc
        self._bar = None

    def __call__(self, step: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.desc, leave=True)
        self._bar.update(step - self._bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
