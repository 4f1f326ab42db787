"""evaluate: test-set figures for every run of one batch size, written beside its training's
record (``outputs/evaluate/bs<B>/seed<S>``) and published into that training's MLflow run."""
from __future__ import annotations

from typing import Any

import torch

from ..analysis.scores import score
from ..config import DataError
from ..context import Context, csv_text, read_json, write_atomic, write_json
from ..core.data import load_prepared
from ..core.models import build_model, loss_fn, rebuild_trained


def predict(model, x, batch_size: int):
    """Model outputs for ``x`` in chunks of ``batch_size``; the result does not depend on it."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) \
            if len(x) else torch.empty(0)


def load_trained(ctx: Context, batch_size: int, seed: int, shape, n_out: int, lr: float | None = None):
    path = ctx.train_dir(batch_size, seed, lr) / "model.pt"
    if not path.is_file():
        raise DataError(f"{path} not found: train batch size {batch_size} first (dvc repro train@{batch_size})")
    model = build_model(ctx.params.model, shape, n_out)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def run(ctx: Context, batch_size: int) -> list[dict[str, Any]]:
    data = load_prepared(ctx.data_dir, ("test",))
    results = [run_one(ctx, data, batch_size, seed, lr) for lr, seed in ctx.params.train.trials()]
    ctx.check_params_unchanged(f"evaluate@{batch_size}")  # the stage fails: dvc.lock records nothing
    for metrics in results:
        write_json(ctx.eval_dir(batch_size, metrics["seed"], metrics.get("lr")) / "metrics.json", metrics)
    from ..tracking.sweep import publish_sweep
    publish_sweep(ctx, rebuild_trained)
    return results


def run_one(ctx: Context, data, batch_size: int, seed: int, lr: float | None = None) -> dict[str, Any]:
    """The run's test loss and figures (and a linear model's weights); its figure files written."""
    model = load_trained(ctx, batch_size, seed, data.sample_shape, data.n_outputs, lr)
    test = data.test
    out = predict(model, test.x, ctx.params.evaluate.batch_size)
    record = ctx.train_dir(batch_size, seed, lr) / "run.json"
    metrics: dict[str, Any] = {"batch_size": batch_size, "seed": seed, **({} if lr is None else {"lr": lr}),
                               "test_loss": float(loss_fn(data.task)(out, test.y)),
                               "train_record": read_json(record)["record"] if record.is_file() else None}
    folder = ctx.eval_dir(batch_size, seed, lr)
    folder.mkdir(parents=True, exist_ok=True)
    # Each test example's outcome (per_example.csv): the comparison's intervals resample test examples too.
    if data.task == "classification":
        hit = (out.argmax(1) == test.y).to(torch.int64).tolist()
        write_atomic(folder / "per_example.csv", csv_text({"correct": hit}))
        metrics |= score(data.task, test.y.numpy(), out.argmax(1).numpy(), folder)[0]
    else:
        err = (out.reshape(-1) - test.y.reshape(-1)).pow(2).tolist()
        write_atomic(folder / "per_example.csv", csv_text({"sq_error": err}))
        metrics |= score(data.task, test.y.numpy().ravel(), out.numpy().ravel(), folder)[0]
        metrics["weight"] = float(model.weight.detach().flatten()[0])
        metrics["bias"] = float(model.bias.detach()[0])
    return metrics
