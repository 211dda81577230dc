"""The 95% t-interval the report and the plot put on every mean over seeds."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 beyond 30).
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of the mean (half-width ``nan`` for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    return mean, (T95[df - 1] if df <= len(T95) else 1.96) * statistics.stdev(values) / math.sqrt(len(values))
