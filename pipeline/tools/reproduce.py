"""reproduce RUN_ID: re-run a recorded training run and check its metrics step by step.

Refuses (before training) when the workspace's code (pipeline/) or prepared data differ from
the run's. Params come from the run itself, so params.yaml may say anything.
"""
from __future__ import annotations

import csv
import io
import json
import math

import torch

from ..config import parse_params
from ..context import Context, read_manifest
from ..core.data import load_prepared, streams
from ..core.engine import TrainSpec, fit
from ..core.models import build_model, code_sha256
from ..core.transforms import BatchAugment
from ..core.system import pick_device, set_flush_denormal, set_threads
from ..provenance import code_state


class Refused(RuntimeError):
    pass


def _recorded_steps(client, run_id: str) -> dict[str, list[float]]:
    from ..tracking.client import read_artifact
    rows = list(csv.DictReader(io.StringIO(read_artifact(client, run_id, "outputs/steps.csv"))))
    return {k: [float(r[k]) for r in rows] for k in ("step", "samples", "loss")}


def run(ctx: Context, run_id: str, log=print) -> bool:
    from ..tracking.client import read_artifact
    from ..tracking.sweep import open_view
    view = open_view(ctx)
    if view is None:
        raise Refused("the tracking store does not answer (above)")
    client = view.client
    try:
        recorded = client.get_run(run_id)
    except Exception:
        raise Refused(f"run {run_id!r} not found in {view.uri}") from None
    if recorded.data.tags.get("batchlab.role") != "train":
        raise Refused(f"run {run_id} is not a training run (tag batchlab.role={recorded.data.tags.get('batchlab.role')!r})")
    params = parse_params(json.loads(read_artifact(client, run_id, "params.json")))
    batch_size, seed = int(recorded.data.params["batch_size"]), int(recorded.data.params["seed"])
    lr = float(recorded.data.params["lr"]) if params.train.lr_grid else None

    _check_workspace(ctx, recorded, params)

    # Before any parallel work: OpenMP's threads take the setting from the thread that starts them.
    set_flush_denormal(params.train.flush_denormal)
    data = load_prepared(ctx.data_dir, ("train", "val"),
                         stream_train=streams(ctx.data_dir, params.train.memory_budget_mb))
    device = pick_device(params.train.device)
    set_threads(int(recorded.data.params.get("threads", 0)) or params.train.threads)
    torch.manual_seed(seed)
    model = build_model(params.model, data.sample_shape, data.n_outputs)
    augment = BatchAugment(params.train.augment, seed) if params.train.augment else None
    log(f"re-running {run_id}: batch size {batch_size}, seed {seed}{'' if lr is None else f', lr {lr:g}'}, up to {recorded.data.params.get('budget_steps')} steps")
    result = fit(model, TrainSpec(data.train, data.val, params.train.for_run(seed, lr), batch_size, data.task, device,
                                  augment=augment))
    return _compare(_recorded_steps(client, run_id), result.history, log)


def _check_workspace(ctx: Context, recorded, params) -> None:
    """Refuse unless the workspace's code and prepared data are the run's."""
    code = code_state(ctx.workdir)
    want = recorded.data.tags.get("batchlab.code_hash", "none")
    if code.tree != want or code.dirty:
        commit = recorded.data.tags.get("batchlab.git_commit", "none")
        raise Refused(f"code differs: the run's pipeline/ is {want[:12]} (commit {commit[:12]}), the workspace's "
                      f"is {code.tree[:12]}{' with uncommitted changes' if code.dirty else ''}; "
                      f"check out {commit[:12]} first")
    want_model = recorded.data.params.get("model.code_sha256")
    if want_model and want_model != code_sha256(params.model, ctx.workdir):
        raise Refused(f"model code differs: {params.model.code} has sha256 {code_sha256(params.model, ctx.workdir)[:12]}…, "
                      f"the run recorded {want_model[:12]}…; restore the file the run trained with")
    manifest = read_manifest(ctx.data_dir)
    if manifest["data_hash"] != recorded.data.params.get("data.hash"):
        raise Refused(f"data differ: the run used data hash {recorded.data.params.get('data.hash', '?')[:12]}…, "
                      f"{ctx.data_dir} holds {manifest['data_hash'][:12]}…; rerun prepare with the run's params")


def _compare(old: dict[str, list[float]], now, log) -> bool:
    """Every recorded step's loss against the new run's ``History``, bit for bit."""
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
