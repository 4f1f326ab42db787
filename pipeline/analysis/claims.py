"""The report's words: numbers written for people, the recommendation in one sentence, the
tutorial's claims checked against the sweep, and the critical-batch-size story."""
from __future__ import annotations

import html as html_lib
import math
from typing import Any

from ..context import Context
from .stats import NEAR, separated


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
    return f"{plus_minus(row[key], ci)}"


def plus_minus(value: float, ci: float) -> str:
    """``0.954 ± 0.104``: two significant digits of the interval, and at least three of the
    mean, so that rounding never changes which of two figures is larger."""
    if ci <= 0 or not math.isfinite(ci):
        return human(value)
    need = [1 - math.floor(math.log10(ci))]
    if value:
        need.append(2 - math.floor(math.log10(abs(value))))
    digits = max(0, min(8, max(need)))
    return f"{value:,.{digits}f} ± {ci:,.{digits}f}"


def interval_text(lo: float, hi: float) -> str:
    """``0.947 to 0.972``, at the precision that keeps the two ends apart."""
    width = abs(hi - lo)
    digits = max(0, min(8, 1 - math.floor(math.log10(width)))) if width > 0 else 3
    if abs(lo) >= 100 and abs(hi) >= 100:
        digits = 0
    return f"{lo:,.{digits}f} to {hi:,.{digits}f}"


# ------------------------------------------------------------------ what the sweep says

def target_text(ctx: Context, value: float | str | None = None) -> str:
    t = ctx.params.train
    value = t.target_value if value is None else float(value)
    return f"{t.target_metric} {'≥' if t.target_metric == 'val_acc' else '≤'} {value:g}"


def sizes_text(sizes) -> str:
    sizes = [str(b) for b in sizes]
    return sizes[0] if len(sizes) == 1 else f"{', '.join(sizes[:-1])} and {sizes[-1]}"


def test_text(concl: dict[str, Any], bs: int, task: str) -> str:
    """A batch size's test figure with its interval over seeds and test examples."""
    t = (concl.get("test") or {}).get(bs)
    label = "test accuracy" if task == "classification" else "test MSE"
    if not t:
        return f"{label} —"
    if t["seeds"] < 2:
        return (f"{label} {human(t['value'])} (95 % interval {interval_text(t['lo'], t['hi'])} over the "
                f"{t['examples']} test examples only: intervals over seeds need at least two)")
    return (f"{label} {human(t['value'])} (95 % interval {interval_text(t['lo'], t['hi'])} over {t['seeds']} seeds "
            f"and {t['examples']} test examples)")


def ms_text(row: dict[str, Any], key: str) -> str:
    """A figure in seconds, with its interval, in milliseconds: ``5.89 ± 3.49``."""
    return with_ci({"v": row[key] * 1000, "v_ci": row.get(f"{key}_ci", math.nan) * 1000}, "v")


def seconds_text(row: dict[str, Any], key: str) -> str:
    """``5.89 ± 3.49 ms`` below a second, ``2.41 ± 0.30 s`` above."""
    if row.get(key) is not None and row[key] < 1:
        return ms_text(row, key) + " ms"
    return with_ci(row, key) + " s"


def ties_text(rec: dict[str, Any]) -> str:
    """Which other batch sizes come close to the answer on time: informative, and (unlike the answer)
    free to change with a machine's timing noise."""
    near = [x for x in rec.get("near", []) if x != rec["batch_size"]]
    alone = math.isnan(rec.get("row", {}).get("time_to_target_s_ci", math.nan))
    parts = ([f"within {NEAR:.0%} of the quickest steady time as well: {sizes_text(near)}"] if near else []) + \
        (["no time intervals to compare (one seed)"] if alone else
         [f"time intervals overlapping its: {sizes_text(rec['ties'])}"] if rec.get("ties") else [])
    return "; ".join(parts) if parts else "no other batch size comes close on time"


def recommendation_text(ctx: Context, concl: dict[str, Any], task: str, markup: bool = False) -> str:
    """The sweep's answer in one sentence: which batch size and rate, why (validation only), what it
    costs, and its test figure (reported, never used to choose)."""
    rec, fit = concl["recommended"], concl["largest_fit"]
    if rec.get("batch_size") is None:
        return f"No recommendation (not determined): {rec['why']}."
    row = rec["row"]
    b = (lambda x: f"<b>{x}</b>") if markup else str
    lr = f" at lr {row['lr_effective']:.3g}" if row.get("lr_effective") else ""
    stalls = (f", measured {seconds_text(row, 'wall_to_target_s')} with stalls" if row.get("wall_to_target_s") is not None
              else "")
    why = (f"it reaches {target_text(ctx)} on the validation split in {with_ci(row, 'steps_to_target')} steps, "
           f"{seconds_text(row, 'time_to_target_s')} of steady steps{stalls}: the least time among the batch sizes that "
           f"reached it in every seed, or the smallest within {NEAR:.0%} of it")
    cost = f"{human(row.get('step_memory_bytes'), 'step_memory_bytes')} a step, computed"
    if fit is None:
        big = ""
    elif fit["whole_split"]:
        big = (f"; the largest batch that fits {fit['budget_bytes'] / 2**20:,.0f} MiB is the whole training split "
               f"({fit['batch_size']:,} samples)")
    else:
        big = (f"; the largest batch that fits {fit['budget_bytes'] / 2**20:,.0f} MiB is about {fit['batch_size']:,}"
               + (" (extrapolated from the sizes measured)" if fit["batch_size"] > fit["measured_up_to"] else ""))
    edge = next((side for side, (_, sizes) in grid_edges(ctx, concl).items() if rec["batch_size"] in sizes), None)
    if edge:
        lr += f" (the {edge} rate tried: a wider search may change this answer)"
    return (f"Use batch size {b(rec['batch_size'])}{lr}: {why} ({cost}){big}. Reported, not chosen on: "
            f"{test_text(concl, rec['batch_size'], task)}.")


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
    TO_TARGET: "seconds to target are steps to target times the steady step (each batch size at its tuned rate); "
               "holds where they fall at every step up, the smallest and largest intervals separate "
               "and no larger batch size misses a target a smaller one reached; does not hold where a larger "
               "one takes longer (intervals separate) or misses it; else inconclusive",
    MEMORY: "on a GPU, the allocator's measured peak; on a CPU, the bytes a step's tensors hold, computed (a "
            "process's resident memory does not resolve them); holds where it rises at every step up in batch "
            "size; does not hold where it falls",
    UNSTABLE: "tested by divergence, which can fail: the learning rates tried for each batch size (its search "
              "or the grid) whose loss became non-finite or ended above where it started; holds where a smaller "
              "batch size diverged at a rate a larger one trained at; does not hold where a larger one diverged "
              "at a rate a smaller one trained at; not determined where no rate diverged",
    SHUFFLE: "holds where the shuffled sweep's test score beats the shuffle-off control's (intervals separate) "
             "at the same batch size; measured by two sweeps that differ in train.shuffle alone",
}


def claims(ctx: Context, rows, task, concl=None) -> list[dict[str, str]]:
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
    out.append(_memory_claim(rows, bool((concl or {}).get("gpu"))))
    out.append(_stability_claim(ctx, concl))
    out.append(_shuffle_claim(ctx, rows, task))
    return [c | {"rule": RULES[c["claim"]]} for c in out]


def _to_target_claim(rows) -> dict[str, str]:
    reached = [r for r in rows if r.get("time_to_target_s") is not None]
    missed_after = [r["batch_size"] for r in rows if r.get("time_to_target_s") is None
                    and any(x["batch_size"] < r["batch_size"] for x in reached)]
    numbers = "; ".join(f"{_to_target(r)} at {r['batch_size']}" for r in rows)
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
        return seconds_text(row, "time_to_target_s")
    return f"target reached in {row.get('reached', 0)}/{row.get('n', '?')} seeds"


def _memory_claim(rows, gpu: bool) -> dict[str, str]:
    """On a GPU (the sweep's runs trained on one) the allocator's peak; on a CPU the computed bytes."""
    first, last = rows[0], rows[-1]
    key, how = ("peak_memory_bytes", "measured: the allocator's peak") if gpu else \
        ("step_memory_bytes", "computed: the bytes of the step's tensors, not a measurement")
    up, down = _monotone(rows, key, True), _monotone(rows, key, False)
    verdict = "holds" if up else "does not hold here" if down else "inconclusive"
    return {"claim": MEMORY, "numbers": f"a step holds {with_ci(first, key)} at batch size {first['batch_size']}, "
                                        f"{with_ci(last, key)} at {last['batch_size']} ({how})",
            "verdict": verdict + ("" if gpu else " (computed)")}


def diverged_rates(concl) -> dict[int, tuple[set[float], set[float]]]:
    """Per batch size, the effective rates tried that diverged and those that trained."""
    out = {}
    for bs, found in (concl.get("searches") or {}).items():
        bad = {round(t["lr_effective"], 12) for t in found["trials"] if t["diverged"]}
        good = {round(t["lr_effective"], 12) for t in found["trials"] if not t["diverged"]}
        out[bs] = (bad, good)
    return out


def _stability_claim(ctx: Context, concl) -> dict[str, str]:
    """Divergence across the rates tried: a smaller batch size failing where a larger one trains."""
    tried = diverged_rates(concl or {})
    if not tried:
        return {"claim": UNSTABLE, "numbers": "no learning-rate search in this sweep (train.lr_search)",
                "verdict": "not determined (no rates tried)"}
    smaller_fails = [(a, b) for a in tried for b in tried if a < b and tried[a][0] & tried[b][1]]
    larger_fails = [(a, b) for a in tried for b in tried if a < b and tried[b][0] & tried[a][1]]
    numbers = "; ".join(f"batch size {bs}: diverged at {', '.join(f'{x:.3g}' for x in sorted(bad)) or 'none'} "
                        f"of {len(bad) + len(good)} rates" for bs, (bad, good) in sorted(tried.items()))
    if not any(bad for bad, _ in tried.values()):
        verdict = "not determined: no rate diverged at any batch size"
    elif smaller_fails and not larger_fails:
        verdict = "holds"
    elif larger_fails and not smaller_fails:
        verdict = "does not hold here"
    else:
        verdict = "inconclusive"
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
    """The critical batch size at the headline target: the fit with its interval, or "not
    determined" and why; the model-free figure; the noise scale with what it can and cannot say."""
    key = concl["targets"][-1]
    crit, noise = concl["critical"], concl["noise"][key]
    used = sizes_text(crit["sizes"]) if crit["sizes"] else "none"
    if crit["status"] == "fitted":
        hi = "∞" if math.isinf(crit["hi"]) else f"{crit['hi']:,.0f}"
        fit = (f"Critical batch size at {target_text(ctx, key)}: <b>{crit['value']:,.0f}</b> (95 % interval "
               f"{crit['lo']:,.0f} to {hi}, over seeds, the learning-rate choice"
               + (" and leaving one batch size out" if crit.get("leave_one_out") else
                  "; leaving one batch size out needs four sizes and is not covered") +
               f"). The fit S = S_min (1 + B_crit / B) (McCandlish et al. 2018) to the steps of batch sizes {used} "
               f"gives S_min = {crit['s_min']:,.1f} steps and E_min = S_min·B_crit = {crit['e_min']:,.0f} samples. "
               f"Well below B_crit, doubling the batch nearly halves the steps; well above it, the steps stay near "
               f"S_min and the extra samples are wasted.")
    else:
        fit = (f"Critical batch size at {target_text(ctx, key)}: <b>not determined</b>: {crit['why']} "
               f"(batch sizes that reached it in every seed: {used}).")
    free = crit.get("model_free")
    if free is not None:
        if math.isinf(free):
            fit += (f" Model-free: steps stay within {OVER} of linear scaling up to the largest batch size that "
                    f"reached the target ({max(crit['sizes'])}): the 20 % critical batch size is above it.")
        else:
            fit += (f" Model-free (Zhang et al. 2024): steps exceed linear scaling from batch size "
                    f"{crit['sizes'][0]} by {OVER} at batch size {free:,.0f} (interval "
                    f"{_bound(crit['model_free_lo'])} to {_bound(crit['model_free_hi'])}).")
    if noise["median"]:
        fit += (f" The gradient noise scale B_simple of the models where runs stopped at the target: {noise['median']:,.0f} "
                f"(median of {noise['n']} of {noise['of']} runs; {noise['range'][0]:,.0f} to {noise['range'][1]:,.0f}), "
                f"from gradients at fixed parameters with B_big ≫ B_small. It describes SGD's raw gradients; "
                f"{ctx.params.train.optimizer.capitalize()}'s preconditioned updates"
                if ctx.params.train.optimizer == "adam" else
                f" The gradient noise scale B_simple of the models where runs stopped at the target: "
                f"{noise['median']:,.0f} (median of {noise['n']} of {noise['of']} runs). For plain SGD without momentum")
        fit += (" loosen its link with B_crit, so it is a reference, not a second estimate."
                if ctx.params.train.optimizer == "adam" else
                " theory expects B_crit near it where the curvature is alike in every direction.")
    elif noise["of"]:
        fit += " The gradient noise scale could not be determined where runs reached the target."
    return fit


OVER = "20 %"


def _bound(v) -> str:
    return "∞" if v is None or math.isinf(v) else f"{v:,.0f}"


def curve_rows(ctx: Context, concl) -> list[dict[str, str]]:
    """The critical batch size at every target, for the report's table."""
    out = []
    for key, c in concl["critical_by_target"].items():
        fitted = c["status"] == "fitted"
        res = ", ".join(f"{b}: {v:+.0%}".replace("-0%", "+0%") for b, v in c["residuals"].items()) or "—"
        out.append({"target": target_text(ctx, key),
                    "b_crit": (f"{c['value']:,.0f} ({_bound(c['lo'])} to {_bound(c['hi'])})" if fitted
                               else f"not determined: {c['why']}"),
                    "s_min": f"{c['s_min']:,.1f}" if fitted else "—",
                    "e_min": f"{c['e_min']:,.0f}" if fitted and c["e_min"] else "—",
                    "residuals": res,
                    "model_free": "—" if c["model_free"] is None else f"> {max(c['sizes'])}" if math.isinf(c["model_free"])
                    else f"{c['model_free']:,.0f}",
                    "b_simple": human(concl["noise"][key]["median"])})
    return out


def grid_edges(ctx: Context, concl) -> dict[str, tuple[float, list[int]]]:
    """Batch sizes whose chosen rate is the lowest or highest tried (grid or search): the optimum
    may lie outside."""
    choice, grid = concl.get("lr_choice"), ctx.params.train.lr_grid
    if concl.get("searches"):
        out: dict[str, tuple[float, list[int]]] = {}
        for bs, found in concl["searches"].items():
            rates = [t["lr"] for t in found["trials"]]
            if found["at_edge"]:
                side = "lowest" if found["chosen"] == min(rates) else "highest"
                out[side] = (found["chosen"], out.get(side, (0, []))[1] + [bs])
        return out
    if not choice or len(grid) < 2:
        return {}
    out = {}
    for side, rate in (("lowest", min(grid)), ("highest", max(grid))):
        sizes = [bs for bs, c in choice.items() if c["lr"] == rate]
        if sizes:
            out[side] = (rate, sizes)
    return out
