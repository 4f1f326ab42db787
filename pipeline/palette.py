"""One colour per batch size, the same in the report's plots and in the MLflow UI (tag
``mlflow.runColor``): doubling the batch moves one step along a fixed palette."""
from __future__ import annotations

import math

# Matplotlib's tab10 without its grey: distinct on white, and in the same order everywhere.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def batch_size_colour(batch_size: int) -> str:
    return PALETTE[round(math.log2(max(batch_size, 1))) % len(PALETTE)]
