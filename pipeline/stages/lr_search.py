"""The learning rate of one batch size, tuned before its runs (train.lr_search): Shallue et al.
(2018) compare batch sizes each at its own best metaparameters, since one rate for all favours
the batch size it happens to suit.

Rates ``lr_search_factor`` apart around the scaling rule's rate for this batch size, each
trained once with the first seed until it reaches train.target_value (or its step budget). The
best is the fewest steps to that target on the validation split; rates within 5 % of it are
tied, and the tie goes to the fewest steps summed over the easier targets (a second validation
figure). While the best is the lowest or highest rate tried, one more rate beyond it is tried,
up to ``lr_search_trials``. The other seeds then train at the chosen rate. The test split plays
no part. Every trial is recorded in ``outputs/train/bs<B>/lr_search.json``; the search is kept in
``checkpoints/`` so that a stage run again after a stop does not search again, and removed when
every seed has trained (``done``): a stage run again for another reason (its code changed) searches
again.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..context import Context, read_json, write_json
from ..core.engine import Hooks, TrainSpec, fit, scaled_lr
from ..core.models import build_model
from ..core.signals import NonFiniteLoss

TIE = 0.05  # rates whose steps to the target are within this share of the best are tied


def score(trial: dict[str, Any]) -> tuple[float, float]:
    """(steps to the headline target, steps summed over every target): lower is better; a target
    missed counts as infinitely many steps."""
    steps = trial["steps_to"]
    return steps["headline"] if steps["headline"] is not None else math.inf, \
        sum(v if v is not None else math.inf for k, v in steps.items() if k != "headline")


def best(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen trial: fewest steps to the headline target, ties (within ``TIE``) to the fewest
    steps to the easier ones, then to the lowest final validation loss."""
    top = min(score(t)[0] for t in trials)
    pool = [t for t in trials if score(t)[0] <= top * (1 + TIE)] if math.isfinite(top) else trials
    return min(pool, key=lambda t: (score(t)[1], t["final_val_loss"] if t["final_val_loss"] is not None
                                    and math.isfinite(t["final_val_loss"]) else math.inf, t["lr"]))


def search(trial: Callable[[float], dict[str, Any]], start: float, factor: float, max_trials: int) -> dict[str, Any]:
    """Three rates around ``start``, widened while the best sits at an edge."""
    trials = [trial(start / factor), trial(start), trial(start * factor)]
    while len(trials) < max_trials:
        rates = sorted(t["lr"] for t in trials)
        chosen = best(trials)["lr"]
        if chosen == rates[0]:
            trials.append(trial(rates[0] / factor))
        elif chosen == rates[-1]:
            trials.append(trial(rates[-1] * factor))
        else:
            break
    trials.sort(key=lambda t: t["lr"])
    rates = [t["lr"] for t in trials]
    chosen = best(trials)["lr"]
    i = rates.index(chosen)
    return {"chosen": chosen, "trials": trials, "from_edge": min(i, len(rates) - 1 - i),
            "at_edge": i in (0, len(rates) - 1), "factor": factor}


def run(ctx: Context, batch_size: int) -> dict[str, Any] | None:
    """The search of ``batch_size``, or None where its rate is not searched (a grid, a fixed
    rate, a torchrun world)."""
    import os
    p = ctx.params.train
    if not p.searches() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    from . import train
    seed = p.seeds[0]
    (probe,) = train.prepare_jobs(ctx, batch_size, (seed,), lr=p.lr)
    kept = _kept(ctx, batch_size)
    saved = read_json(kept) if kept.is_file() else {}
    if saved.get("sweep_key") == probe.sweep_key:
        result = saved["search"]
    else:
        result = search(lambda lr: _trial(probe, lr), p.lr, p.lr_search_factor, p.lr_search_trials)
        result |= {"seed": seed, "batch_size": batch_size, "metric": p.target_metric,
                   "targets": p.targets(), "rule": p.lr_scaling, "base_batch_size": p.base_batch_size}
        write_json(kept, {"sweep_key": probe.sweep_key, "search": result})
    write_json(ctx.train_dir(batch_size) / "lr_search.json", result)
    return result


def _kept(ctx: Context, batch_size: int):
    return ctx.workdir / "checkpoints" / f"bs{batch_size}-lr-search.json"


def done(ctx: Context, batch_size: int) -> None:
    """Every seed of ``batch_size`` trained at the searched rate: the kept search goes, as the
    runs' checkpoints do."""
    _kept(ctx, batch_size).unlink(missing_ok=True)


def _trial(probe, lr: float) -> dict[str, Any]:
    """One training of the search: the first seed at ``lr``, nothing recorded but its figures."""
    from ..core.engine import target_key
    p = probe.ctx.params.train.for_run(probe.seed, lr)
    torch.manual_seed(probe.seed)
    model = build_model(probe.ctx.params.model, probe.data.sample_shape, probe.data.n_outputs)
    spec = TrainSpec(probe.data.train, probe.data.val, p.model_copy(update={"noise_scale": False}),
                     probe.batch_size, probe.data.task, probe.device)
    out: dict[str, Any] = {"lr": lr, "lr_effective": scaled_lr(p, probe.batch_size), "diverged": False}
    try:
        result = fit(model, spec, Hooks())
    except NonFiniteLoss:
        return out | {"steps": None, "final_val_loss": None, "diverged": True,
                      "steps_to": {"headline": None} | {target_key(v): None for v in p.targets()[:-1]}}
    crossed = result.crossings
    steps_to = {target_key(v): (crossed[target_key(v)]["step"] if target_key(v) in crossed else None)
                for v in p.targets()[:-1]}
    last = result.history.evals[-1] if result.history.evals else {}
    first = result.history.evals[0] if result.history.evals else {}
    # A loss that ends above where it started has blown up, finite or not.
    blew_up = bool(last) and last["val_loss"] > first.get("val_loss", math.inf)
    return out | {"steps": result.steps, "final_val_loss": last.get("val_loss"), "diverged": blew_up,
                  "steps_to": {"headline": result.target["step"] if result.target else None} | steps_to}


def line(result: dict[str, Any]) -> str:
    """The search in one line: the effective rates tried, their steps to the target, the choice."""
    tried = ", ".join(f"{t['lr_effective']:.3g}" + ("" if t["steps_to"]["headline"] is None
                                                    else f" ({t['steps_to']['headline']:.0f})") for t in result["trials"])
    chosen = next(t["lr_effective"] for t in result["trials"] if t["lr"] == result["chosen"])
    where = "at the edge of the rates tried" if result["at_edge"] else f"{result['from_edge']} from the edge"
    return (f"lr search bs={result['batch_size']} seed={result['seed']}: tried {tried} (steps to target); "
            f"chose {chosen:.3g}, {where}")
