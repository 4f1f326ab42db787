"""check: the first stage. It reads the params (their types and allowed values), the network
named (it imports, is known to make a network, takes its keywords) and that the data's files
are there, and writes nothing else but ``outputs/checked.txt``, whose text never changes.

DVC removes a stage's outputs just before it runs the stage's command, so a bad value that only
the stage itself refused would cost that stage's outputs (`dvc exp run -S train.ephocs=5`
removed a training's folder). Every stage comes after this one: a bad value stops `dvc repro`
here, before DVC touches any other output. The text is constant, so a check that passes reruns
nothing after it.
"""
from __future__ import annotations

from pathlib import Path

from ..context import OUT_DIR, Context, write_atomic

CHECKED = OUT_DIR / "checked.txt"


def run(ctx: Context) -> Path:
    from ..config import BUILTIN_MODELS
    from ..core.datasets import check_present
    from ..core.sources import check_data
    p = ctx.params
    check_data(p.data, ctx.workdir)
    check_present(p.data)
    if p.model.target is not None or p.model.name not in BUILTIN_MODELS:
        from ..core.models import check_model
        check_model(p.model, ctx.workdir, build=True)
    path = ctx.workdir / CHECKED
    write_atomic(path, "params, model and data checked\n")
    return path
