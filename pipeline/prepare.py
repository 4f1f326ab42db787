"""prepare: raw data -> seeded train/val/test tensors + manifest, logged to the sweep's parent run."""
from __future__ import annotations

from typing import Any

from .context import Context
from .data import build_splits, write_prepared


def run(ctx: Context) -> dict[str, Any]:
    p = ctx.params
    task, splits = build_splits(p.data)
    source = {"name": p.data.name, "seed": p.data.seed,
              "val_fraction": p.data.val_fraction, "test_fraction": p.data.test_fraction}
    if p.data.name == "linear":
        source |= {"samples": p.data.linear_samples, "noise": p.data.linear_noise}
    ctx.check_params_unchanged("prepare")
    manifest = write_prepared(ctx.data_dir, task, splits, source)
    log_manifest(ctx, manifest)
    return manifest


def log_manifest(ctx: Context, manifest: dict[str, Any]) -> str:
    """The sweep's parent run, with the data set's figures as its params."""
    return ctx.tracker("prepare").sweep_parent(manifest)
