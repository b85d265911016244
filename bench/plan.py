"""A run is a list of jobs; the runner walks it under one progress bar."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """One unit of measurement: ``run()`` returns the result rows of ``section``."""

    section: str
    label: str
    run: Callable[[], list[dict]]
