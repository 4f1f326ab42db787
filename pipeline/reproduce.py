"""reproduce RUN_ID: re-run a recorded training run and check its metrics step by step.

Refuses (before training) when the workspace's code or prepared data differ from the run's.
"""
from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path

import torch

from .config import parse_params
from .context import Context
from .data import load_prepared, read_manifest
from .engine import NullSink, fit
from .models import build_model
from .system import git_state, pick_device, set_threads


class Refused(RuntimeError):
    pass


def _recorded_steps(client, run_id: str) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "outputs/steps.csv", tmp)
        rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    return {k: [float(r[k]) for r in rows] for k in ("step", "samples", "loss")}


def run(ctx: Context, run_id: str, log=print) -> bool:
    tracker = ctx.tracker()
    try:
        recorded = tracker.client.get_run(run_id)
    except Exception:
        raise Refused(f"run {run_id!r} not found in {tracker.uri}") from None
    if recorded.data.tags.get("batchlab.role") != "train":
        raise Refused(f"run {run_id} is not a training run (tag batchlab.role={recorded.data.tags.get('batchlab.role')!r})")
    params = parse_params(_load_params(tracker.client, run_id))
    batch_size = int(recorded.data.params["batch_size"])

    commit, dirty = git_state(ctx.workdir)
    want = recorded.data.tags.get("batchlab.git_commit", "none")
    if commit != want or dirty:
        raise Refused(f"code differs: the run was made at commit {want}, the workspace is at {commit}"
                      f"{' with uncommitted changes' if dirty else ''}; check out {want} first")
    manifest = read_manifest(ctx.data_dir)
    if manifest["data_hash"] != recorded.data.params.get("data.hash"):
        raise Refused(f"data differ: the run used data hash {recorded.data.params.get('data.hash', '?')[:12]}…, "
                      f"{ctx.data_dir} holds {manifest['data_hash'][:12]}…; rerun prepare with the run's params")

    data = load_prepared(ctx.data_dir, ("train", "val"))
    device = pick_device(params.train.device)
    set_threads(int(recorded.data.params.get("threads", 0)) or params.train.threads)
    torch.manual_seed(params.train.seed)
    model = build_model(params.model, data.n_features, data.n_outputs)
    log(f"re-running {run_id}: batch size {batch_size}, {recorded.data.params.get('total_steps')} steps")
    result = fit(model, data.train, data.val, params.train, batch_size, data.task, device, NullSink())
    old = _recorded_steps(tracker.client, run_id)
    now = result.history
    if len(old["loss"]) != len(now.loss):
        log(f"MISMATCH: recorded {len(old['loss'])} steps, now {len(now.loss)}")
        return False
    bad = [i for i, (a, b) in enumerate(zip(old["loss"], now.loss)) if a != b and not (math.isnan(a) and math.isnan(b))]
    if bad:
        i = bad[0]
        log(f"MISMATCH at {len(bad)} of {len(now.loss)} steps; first at optimizer step {int(old['step'][i])}: "
            f"recorded loss {old['loss'][i]!r}, now {now.loss[i]!r}")
        return False
    log(f"reproduced exactly: {len(now.loss)} optimizer steps, every loss identical "
        f"(final {now.loss[-1]!r})")
    return True


def _load_params(client, run_id: str) -> dict:
    import json
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "params.json", tmp)).read_text())
