"""prepare: raw data -> seeded train/val/test tensors + manifest, shown on the sweep's parent run."""
from __future__ import annotations

from typing import Any

from typing import Callable

from ..context import Context
from ..core.data import write_prepared
from ..core.sources import build_splits


def run(ctx: Context, check: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """``check(task, splits)`` sees the data before anything is written, and may refuse it (the
    command line checks that the network takes the data's shape: that shapes no output)."""
    p = ctx.params
    task, splits = build_splits(p.data)
    source = {"name": p.data.name, "seed": p.data.seed,
              "val_fraction": p.data.val_fraction, "test_fraction": p.data.test_fraction}
    if p.data.name == "linear":
        source |= {"samples": p.data.linear_samples, "noise": p.data.linear_noise}
    elif p.data.target is not None:
        source = {"name": p.data.target, "seed": p.data.seed, "val_fraction": p.data.val_fraction,
                  "test_fraction": p.data.test_fraction, "kwargs": p.data.kwargs}
    elif p.data.name != "digits":
        source["root"] = p.data.root
    if p.data.transforms:
        source["transforms"] = list(p.data.transforms)
    if check is not None:
        check(task, splits)
    ctx.check_params_unchanged("prepare")
    manifest = write_prepared(ctx.data_dir, task, splits, source)
    from ..tracking.sweep import publish_parent
    publish_parent(ctx)
    return manifest
