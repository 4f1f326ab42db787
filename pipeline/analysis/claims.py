"""The report's words: numbers written for people, the recommendation in one sentence, the
tutorial's claims checked against the sweep, and the critical-batch-size story."""
from __future__ import annotations

import html as html_lib
import math
from typing import Any

from ..context import Context
from .stats import separated


def human(v: Any, key: str = "") -> str:
    """Numbers for people: 129,837 samples/s, 0.962, 3.1 s, 38 kB."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if key.endswith("_bytes"):
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(v) >= size:
                return f"{v / size:,.1f} {unit}"
        return f"{v:,.0f} B"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.1f}"
    return html_lib.escape(str(v))


def with_ci(row: dict[str, Any], key: str) -> str:
    """``0.962 ± 0.008`` (the 95 % interval's half-width, in the mean's own precision)."""
    if row.get(key) is None:
        return "—"
    ci = row.get(f"{key}_ci", math.nan)
    if math.isnan(ci) or ci == 0:  # one seed, or every seed gave the same figure
        return human(row[key], key)
    if key.endswith("_bytes"):
        return f"{human(row[key], key)} ± {human(ci, key)}"
    if abs(row[key]) >= 1000:
        return f"{row[key]:,.0f} ± {ci:,.0f}"
    digits = max(0, min(6, -math.floor(math.log10(ci)))) if ci > 0 else 3  # one significant digit of the interval
    return f"{row[key]:.{digits}f} ± {ci:.{digits}f}"


# ------------------------------------------------------------------ what the sweep says

def target_text(ctx: Context) -> str:
    t = ctx.params.train
    return f"{t.target_metric} {'≥' if t.target_metric == 'val_acc' else '≤'} {t.target_value:g}"


def sizes_text(sizes) -> str:
    sizes = [str(b) for b in sizes]
    return sizes[0] if len(sizes) == 1 else f"{', '.join(sizes[:-1])} and {sizes[-1]}"


def recommendation_text(ctx: Context, concl: dict[str, Any], task: str, markup: bool = False) -> str:
    """The sweep's answer in one sentence: which batch size, why, and what it and the largest
    batch that fits the memory cost."""
    rec, fit = concl["recommended"], concl["largest_fit"]
    if rec is None:
        return "No recommendation: no batch size has a test score."
    row, score = rec["row"], rec["score"]
    b = (lambda x: f"<b>{x}</b>") if markup else str
    label = "test accuracy" if score == "test_acc" else "test MSE"
    others = [x for x in rec["not_worse"] if x != rec["batch_size"]]
    pool = (f"the least among the batch sizes whose {label} is not worse ({sizes_text(rec['not_worse'])}: intervals overlap)"
            if others else f"the only batch size with the best {label}")
    if rec["basis"] == "time_to_target_s":
        why = (f"it reaches {target_text(ctx)} in {with_ci(row, 'time_to_target_s')} s of training, {pool}"
               + (f"; tied on time with {sizes_text(rec['ties'])}" if rec["ties"] else ""))
    else:
        why = (f"no batch size with the best {label} reached {target_text(ctx)} in every seed; of those, it runs the "
               f"most samples per second ({with_ci(row, 'throughput')})")
    cost = (f"{label} {with_ci(row, score)}, {human(row.get('step_memory_bytes'), 'step_memory_bytes')} a step")
    if fit is None:
        big = ""
    elif fit["whole_split"]:
        big = (f"; the largest batch that fits {fit['budget_bytes'] / 2**20:,.0f} MiB is the whole training split "
               f"({fit['batch_size']:,} samples, about {human(fit['bytes'], 'step_memory_bytes')} a step)")
    else:
        big = (f"; the largest batch that fits {fit['budget_bytes'] / 2**20:,.0f} MiB is about {fit['batch_size']:,} "
               f"({human(fit['bytes'], 'step_memory_bytes')} a step" + (", extrapolated from the sizes measured)"
                                                                if fit["batch_size"] > fit["measured_up_to"] else ")"))
    lr = f" at lr {row['lr']:g}" if ctx.params.train.lr_grid and row.get("lr") else ""
    edge = next((side for side, (_, sizes) in grid_edges(ctx, concl).items() if rec["batch_size"] in sizes), None)
    if edge:
        lr += f" (the grid's {edge} rate: a wider train.lr_grid may change this answer)"
    return f"Use batch size {b(rec['batch_size'])}{lr}: {why} ({cost}){big}."


def _steps_up(rows, key: str) -> list[tuple[dict, dict]]:
    pts = [r for r in rows if r.get(key) is not None]
    return list(zip(pts, pts[1:]))


def _monotone(rows, key: str, up: bool) -> bool:
    pairs = _steps_up(rows, key)
    return bool(pairs) and all((b[key] > a[key]) if up else (b[key] < a[key]) for a, b in pairs)


def _ends_separate(rows, key: str) -> bool:
    pts = [r for r in rows if r.get(key) is not None]
    return len(pts) >= 2 and separated(pts[0], pts[-1], key)


THROUGHPUT = "Batching is faster (per sample): a larger batch size processes more samples per second."
TO_TARGET = "Batching is faster (to a result): a larger batch size reaches the target accuracy in less time."
MEMORY = "Bigger batches cost memory."
UNSTABLE = ("Too small is unstable: a smaller batch size might lead to less stable training and "
            "slower convergence.")
SHUFFLE = "Shuffling matters: shuffled batches keep the model from learning the data's order."
RULES = {
    THROUGHPUT: "holds where samples/s rises at every step up in batch size and the smallest and largest "
                "intervals separate; does not hold where it falls (intervals separate); else inconclusive",
    TO_TARGET: "holds where seconds to target fall at every step up, the smallest and largest intervals separate "
               "and no larger batch size misses a target a smaller one reached; does not hold where a larger "
               "one takes longer (intervals separate) or misses it; else inconclusive",
    MEMORY: "holds where a step's memory rises at every step up in batch size; does not hold where it falls",
    UNSTABLE: "holds where the smallest batch size's per-step loss spread is above the largest's and its seconds "
              "to target too (intervals separate, or only the smallest missed the target); partly where only "
              "the spread is; does not hold where the spread is not above (intervals separate); else inconclusive",
    SHUFFLE: "holds where the shuffled sweep's test score beats the shuffle-off control's (intervals separate) "
             "at the same batch size; measured by two sweeps that differ in train.shuffle alone",
}


def claims(ctx: Context, rows, task) -> list[dict[str, str]]:
    """The tutorial's claims, each with its rule, the sweep's numbers and the verdict the rule
    gives. Each compares batch sizes, so a sweep of one batch size measures none of them."""
    if len(rows) < 2:
        alone = (f"this sweep has one batch size ({rows[0]['batch_size']}): nothing to compare it with; "
                 "list two or more in train.batch_sizes")
        return [{"claim": c, "rule": RULES[c], "numbers": alone, "verdict": "not measured (one batch size)"}
                for c in (THROUGHPUT, TO_TARGET, MEMORY, UNSTABLE)] + [_shuffle_claim(ctx, rows, task)]
    first, last = rows[0], rows[-1]
    out = []
    ratio = last["throughput"] / first["throughput"] if first.get("throughput") else math.nan
    rises, falls = _monotone(rows, "throughput", True), _monotone(rows, "throughput", False)
    sep = _ends_separate(rows, "throughput")
    out.append({"claim": THROUGHPUT, "numbers": f"{with_ci(first, 'throughput')} samples/s at batch size "
                f"{first['batch_size']}, {with_ci(last, 'throughput')} at {last['batch_size']} ({ratio:,.1f}x)",
                "verdict": "holds" if rises and sep else "does not hold here" if falls and sep else "inconclusive"})
    out.append(_to_target_claim(rows))
    direction_up, direction_down = _monotone(rows, "step_memory_bytes", True), _monotone(rows, "step_memory_bytes", False)
    out.append({
        "claim": MEMORY,
        "numbers": f"a step holds {with_ci(first, 'step_memory_bytes')} at batch size {first['batch_size']}, "
                   f"{with_ci(last, 'step_memory_bytes')} at {last['batch_size']} "
                   f"({human(first.get('bytes_per_sample'))} bytes per sample)",
        "verdict": "holds" if direction_up else "does not hold here" if direction_down else "inconclusive"})
    out.append(_stability_claim(rows, task))
    out.append(_shuffle_claim(ctx, rows, task))
    return [c | {"rule": RULES[c["claim"]]} for c in out]


def _to_target_claim(rows) -> dict[str, str]:
    reached = [r for r in rows if r.get("time_to_target_s") is not None]
    missed_after = [r["batch_size"] for r in rows if r.get("time_to_target_s") is None
                    and any(x["batch_size"] < r["batch_size"] for x in reached)]
    numbers = "; ".join(f"{_to_target(r)} s at {r['batch_size']}" if r.get("time_to_target_s") is not None
                        else f"{_to_target(r)} at {r['batch_size']}" for r in rows)
    slower = any(separated(a, b, "time_to_target_s") and b["time_to_target_s"] > a["time_to_target_s"]
                 for a, b in zip(reached, reached[1:]))
    if len(reached) < 2 and not missed_after:
        verdict = "inconclusive"
    elif missed_after or slower:
        verdict = "does not hold here"
    elif _monotone(reached, "time_to_target_s", False) and _ends_separate(reached, "time_to_target_s"):
        verdict = "holds"
    else:
        verdict = "inconclusive"
    return {"claim": TO_TARGET, "numbers": "seconds to target: " + numbers, "verdict": verdict}


def _to_target(row) -> str:
    if row.get("time_to_target_s") is not None:
        return with_ci(row, "time_to_target_s")
    return f"target reached in {row.get('reached', 0)}/{row.get('n', '?')} seeds"


def _stability_claim(rows, task) -> dict[str, str]:
    first, last = rows[0], rows[-1]
    score = "test_acc" if task == "classification" else "test_mse"
    has_spread = first.get("loss_noise") is not None and last.get("loss_noise") is not None
    sep = has_spread and separated(first, last, "loss_noise")
    noisier = sep and first["loss_noise"] > last["loss_noise"]
    calmer = sep and first["loss_noise"] < last["loss_noise"]
    if first.get("time_to_target_s") is None:
        slower = last.get("time_to_target_s") is not None
    else:
        slower = (last.get("time_to_target_s") is not None and first["time_to_target_s"] > last["time_to_target_s"]
                  and separated(first, last, "time_to_target_s"))
    numbers = (f"per-step loss spread (last epoch, relative) {with_ci(first, 'loss_noise')} at batch size "
               f"{first['batch_size']} vs {with_ci(last, 'loss_noise')} at {last['batch_size']}; "
               f"{score} {with_ci(first, score)} vs {with_ci(last, score)}; seconds to target "
               f"{_to_target(first)} vs {_to_target(last)}")
    verdict = ("holds" if noisier and slower else "partly: noisier, not slower to the target" if noisier
               else "does not hold here" if calmer else "inconclusive")
    return {"claim": UNSTABLE, "numbers": numbers, "verdict": verdict}


def _shuffle_claim(ctx: Context, rows, task) -> dict[str, str]:
    score = "test_acc" if task == "classification" else "test_mse"
    accs = "; ".join(f"{with_ci(r, score)} at {r['batch_size']}" for r in rows)
    if ctx.params.train.shuffle:
        return {"claim": SHUFFLE, "rule": RULES[SHUFFLE],
                "numbers": f"this sweep shuffles ({score} {accs}); its control is "
                           f"`dvc exp run -S train.shuffle=false`, read beside it in `dvc exp show`",
                "verdict": "measured against the control sweep"}
    return {"claim": SHUFFLE, "rule": RULES[SHUFFLE],
            "numbers": f"this sweep is the shuffle-off control: every epoch reads the split in its stored order "
                       f"({score} {accs}); compare with the shuffled sweep in `dvc exp show`",
            "verdict": "this is the control"}


def critical_story(ctx: Context, rows, concl) -> str:
    """One critical batch size, with its interval and the evidence."""
    crit, noise, span = concl["critical"], concl["noise_at_target"], concl["noise_at_target_range"]
    used = sizes_text(crit["sizes"]) if crit["sizes"] else "none"
    if crit["status"] == "fitted":
        hi = "∞" if math.isinf(crit["hi"]) else f"{crit['hi']:,.0f}"
        fit = (f"Critical batch size <b>{crit['value']:,.0f}</b> (95 % bootstrap interval over seeds "
               f"{crit['lo']:,.0f} to {hi}): the fit S = S_min (1 + B_crit / B) (McCandlish et al. 2018) to the "
               f"steps to target of batch sizes {used} gives S_min = {crit['s_min']:,.0f} steps. Well below "
               f"B_crit, doubling the batch nearly halves the steps; well above it, the steps stay near S_min "
               f"and the extra samples are wasted.")
    elif crit["status"] == "above":
        fit = (f"Steps to target still halve with the batch size up to {max(crit['sizes'])}: the critical batch "
               f"size lies above the sweep (batch sizes used: {used}); add larger batch sizes to place it.")
    elif crit["status"] == "below":
        fit = (f"Larger batches never saved steps here: the critical batch size lies below {min(crit['sizes'])}, "
               f"the smallest batch size swept (used: {used}).")
    else:
        fit = (f"No critical batch size fitted: the fit needs three batch sizes that reached {target_text(ctx)} in "
               f"every seed, and this sweep has {len(crit['sizes'])} ({used}).")
    if noise:
        fit += (f" The check from another measurement: the gradient noise scale B_simple where training reached "
                f"the target is {noise:,.0f} (median over batch sizes; {span[0]:,.0f} to {span[1]:,.0f}), the "
                f"figure theory expects B_crit to be near")
        if crit["status"] == "fitted" and crit["lo"] <= noise <= crit["hi"]:
            fit += ": it lies within the fit's interval, and the two agree."
        elif crit["status"] == "fitted" and crit["value"] > 0:
            ratio = max(noise, crit["value"]) / min(noise, crit["value"])
            fit += (f"; it differs from the fit by a factor of {ratio:,.1f}. B_simple stands for the noise scale only "
                    f"where the loss's curvature is alike in every direction (McCandlish et al. 2018, section 2.2) "
                    f"and is itself noisy at small batches; the fit is made from the outcome that matters (steps "
                    f"to the target), so the recommendation rests on it.")
        else:
            fit += "."
    return fit


def grid_edges(ctx: Context, concl) -> dict[str, tuple[float, list[int]]]:
    """Batch sizes whose chosen rate is the grid's lowest or highest: the optimum may lie outside."""
    choice, grid = concl.get("lr_choice"), ctx.params.train.lr_grid
    if not choice or len(grid) < 2:
        return {}
    out = {}
    for side, rate in (("lowest", min(grid)), ("highest", max(grid))):
        sizes = [bs for bs, c in choice.items() if c["lr"] == rate]
        if sizes:
            out[side] = (rate, sizes)
    return out
