"""One progress bar per run: a bar over the images, the current image's denoising step in its postfix."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


class RunProgress:
    """tqdm over a run's images; `steps` is the pipeline's progress callable for the current image."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "image"):
        from tqdm.auto import tqdm

        self.bar: Any = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)

    def steps(self, done: int, total: int) -> None:
        """Pass as `progress=` to ControlNetPipeline.run: shows "step done/total" beside the image bar."""
        self.bar.set_postfix_str(f"step {done}/{total}", refresh=done == total)

    def note(self, text: str) -> None:
        """What is being worked on, beside the bar."""
        self.bar.set_postfix_str(text)

    def describe(self, desc: str) -> None:
        """Rename the bar (e.g. after the backend now running)."""
        self.bar.set_description(desc)

    def advance(self) -> None:
        self.bar.update(1)

    def write(self, line: str) -> None:
        """Print a line above the bar (without breaking it)."""
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "RunProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def over(self, items: Iterable[T]) -> Iterator[T]:
        """Yield the items, advancing after each."""
        for item in items:
            yield item
            self.advance()


ProgressFn = Callable[[int, int], None]
