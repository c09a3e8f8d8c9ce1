"""Selecting the profiled runs that count, alike for every collector."""
from __future__ import annotations

import statistics
from typing import Callable


def keep_fastest(runs: list, wall: Callable) -> list:
    """The runs no slower than the median run: a shared machine's hiccups dropped alike
    from the structured and the dense model."""
    cut = statistics.median(wall(r) for r in runs)
    return [r for r in runs if wall(r) <= cut]

