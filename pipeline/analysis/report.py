"""The sweep's HTML report (markup in templates/report.html): the answer first, then the table
with intervals, the claims, the critical batch size, the learning rates and the plots."""
from __future__ import annotations

import base64
import html as html_lib
from pathlib import Path
from string import Template
from typing import Any

from ..context import Context
from .claims import (claims, critical_story, curve_rows, grid_edges, human, interval_text, ms_text,
                     recommendation_text, sizes_text, target_text, ties_text, with_ci)

TEMPLATE = Path(__file__).with_name("templates") / "report.html"


GLOSSARY = {
    "± (every figure)": "mean over the seeds and the half-width of its 95 % confidence interval (Student's t); "
                        "two batch sizes differ only where their intervals do not overlap; the plots cut an interval "
                        "at what the figure can be (0, and 1 for an accuracy)",
    "test accuracy / MSE": "reported, never used to choose: its 95 % interval resamples seeds and test examples "
                           "together (the same examples for every batch size); the learning rate and the batch "
                           "size are chosen on the validation split",
    "steps to target": "optimizer steps until validation first reached the target, interpolated between the two "
                       "validations around the crossing; given only when every seed reached it (reached: how many "
                       "did within the budget of train.max_steps; the others are censored, not dropped)",
    "ms to target": "steps to target times the steady step (the median step): stalls of a shared machine "
                    "do not decide a verdict; 'measured' is the wall time of the steps, stalls included, and "
                    "'stalls' the share of it the steady steps do not explain",
    "samples/s": "the batch size over the median optimizer step's seconds: the steady rate (validation, start-up "
                 "and checkpoints excluded); 'waited': samples over the loop's wall time, everything included "
                 "(summary.json's overheads say what took the rest)",
    "step memory": "what one training step holds for its batch (batch, saved activations, outputs), computed",
    "noise scale": "B_simple = tr(Σ)/|G|², the gradient noise scale of the trained model (where runs stop at the "
                   "target, at the target), from micro-batches at fixed parameters after the loop (B_big ≫ B_small, "
                   "averaged, with the finite-data correction); '—' where its draws disagree by more than 1.5x",
}


def _columns(task: str) -> list[tuple[str, str]]:
    """The table's columns: the answer's figures first (a regression's fitted w and b beside its
    score, where the tutorial's example is checked), so that the page reads at 1,000 px."""
    if task == "classification":
        head = [("test", "test accuracy")]
    else:
        head = [("test", "test MSE"), ("weight", "fitted w"), ("bias", "fitted b")]
    return head + [("steps_to_target", "steps to target"), ("time_to_target_s", "ms to target"),
                   ("wall_to_target_s", "measured ms"), ("throughput", "samples/s"),
                   ("step_memory_bytes", "step memory"), ("noise_scale", "noise scale at target")]


def _cell(concl, r, key: str) -> str:
    if key == "test":
        t = (concl.get("test") or {}).get(r["batch_size"])
        return "—" if not t else f"{human(t['value'])}<br><span class=ci>{interval_text(t['lo'], t['hi'])}</span>"
    if key == "throughput" and r.get("loop_throughput") is not None:
        return f"{with_ci(r, key)}<br><span class=ci>waited {human(r['loop_throughput'])}</span>"
    if key in ("time_to_target_s", "wall_to_target_s") and r.get(key) is not None:
        ms = ms_text(r, key)
        stalls = (f"<br><span class=ci>{r['stall_share']:.0%} stalls</span>" if key == "wall_to_target_s"
                  and r.get("stall_share") is not None else "")
        return ms + stalls
    return with_ci(r, key)


def _bullets(ctx: Context, concl: dict[str, Any], rows, runs=()) -> list[str]:
    top, missed = concl["highest_throughput"], concl["missed_target"]
    by = {r["batch_size"]: r for r in rows}
    budget = f"{ctx.params.train.max_steps:,} steps" + (f" or {ctx.params.train.epochs} epochs" if ctx.params.train.epochs else "")
    censored = "; ".join(f"batch size {bs} seed {seed}" for bs, seed, _ in concl["censored"])
    rec = concl["recommended"]
    close = ([f"Beside the answer (batch size {rec['batch_size']}): {ties_text(rec)}."]
             if rec.get("batch_size") is not None else [])
    seeds = len(ctx.params.train.seeds)
    alone = ([f"One seed: no figure has an interval over seeds, so this report claims no difference between "
              f"batch sizes (intervals need at least two seeds; train.seeds: [0, 1, 2] gives three)."]
             if seeds < 2 else [])
    return alone + close + [
        (f"<span class=missed>Missed {target_text(ctx)} within its budget ({budget}) in at least one seed: batch "
         f"size {sizes_text(missed)} (censored runs: {censored}).</span>" if missed else
         f"Every batch size reached {target_text(ctx)} in every seed, at its own tuned learning rate, within its "
         f"budget of {budget}."),
        f"Samples per second (steady steps): highest at batch size {top['batch_size']}, "
        f"{with_ci(by[top['batch_size']], 'throughput')}" + (f" (tied with {sizes_text(top['ties'])})" if top["ties"] else "")
        + ".",
        "Test figures are reported with intervals over seeds and test examples; no choice is made on them.",
    ] + _overheads(runs)


def _overheads(runs) -> list[str]:
    """What a training's loop spent besides its optimizer steps, in shares of its wall time."""
    shares = [r["overheads"] for r in runs if r.get("overheads")]
    if not shares:
        return []
    import statistics
    parts = ", ".join(f"{name} {statistics.median(s.get(name, 0.0) for s in shares):.0%}"
                      for name in ("validation", "checkpoint", "other"))
    total = statistics.median(r["overhead_share"] for r in runs if r.get("overhead_share") is not None)
    noise = [r["noise_scale_seconds"] for r in runs if r.get("noise_scale_seconds") is not None]
    after = (f" After the loop, the noise-scale measurement took {statistics.median(noise) * 1000:,.0f} ms a run "
             f"(median)." if noise else "")
    return [f"The loop's wall time besides the optimizer steps: {total:.0%} (median over runs: {parts}); the "
            f"'waited' samples/s under each rate counts it.{after}"]


def _critical_section(ctx: Context, rows, concl) -> str:
    head = ("<th>target</th><th>B_crit (95 % interval)</th><th>S_min</th><th>E_min (samples)</th>"
            "<th>residuals</th><th>20 % over linear</th><th>B_simple</th>")
    body = "".join("<tr>" + "".join(f"<td{' class=wrap' if k in ('residuals', 'b_crit') else ''}>{html_lib.escape(r[k])}</td>"
                                    for k in ("target", "b_crit", "s_min", "e_min", "residuals", "model_free",
                                              "b_simple")) + "</tr>" for r in curve_rows(ctx, concl))
    fitted = [c["value"] for c in concl["critical_by_target"].values() if c["status"] == "fitted"]
    trend = ("too few targets determined to see a trend" if len(fitted) < 2 else
             "it grows as the target gets harder" if all(b >= a for a, b in zip(fitted, fitted[1:])) else
             "it does not grow steadily as the target gets harder (read the intervals)")
    return (f"<p>{critical_story(ctx, rows, concl)}</p><p>At every target (critical.csv), from the easiest: {trend}."
            f"</p><div class=table-wrap><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _lr_section(ctx: Context, concl) -> str:
    found = concl.get("searches")
    if found:
        body = []
        for bs, f in found.items():
            tried = ", ".join((f"<b>{t['lr_effective']:.3g}</b>" if t["lr"] == f["chosen"] else f"{t['lr_effective']:.3g}")
                              + (" (diverged)" if t["diverged"] else f" ({_steps(t)})") for t in f["trials"])
            edge = "at an edge" if f["at_edge"] else f"{f['from_edge']} from the nearest edge"
            body.append(f"<tr><td>{bs}</td><td>{tried}</td><td>{edge}</td></tr>")
        t = ctx.params.train
        return (f"<p>Each batch size at its own learning rate, searched on the validation split with seed "
                f"{t.seeds[0]}: rates {t.lr_search_factor:g}x apart around the {t.lr_scaling} scaling rule's rate "
                f"(lr {t.lr:g} at batch size {t.base_batch_size}), widened while the best was at an edge (at most "
                f"{t.lr_search_trials}); chosen on steps to {target_text(ctx)} (in brackets), ties within 5 % broken "
                f"on steps to the easier targets. The other seeds trained at the chosen rate. The test split plays "
                f"no part.</p><div class=table-wrap><table><thead><tr><th>batch size</th><th>rates tried (steps to "
                f"target)</th><th>the choice</th></tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    choice = concl.get("lr_choice")
    if not choice:
        return (f"<p>Every batch size trained at lr {ctx.params.train.lr:g} ({ctx.params.train.lr_scaling} scaling). A "
                f"rate tuned for one batch size favours it: <code>train.lr_search: true</code> tunes each.</p>")
    head = "<th>batch size</th>" + "".join(f"<th>lr {x['lr']:g}</th>" for x in next(iter(choice.values()))["by_lr"]) \
        + "<th>chosen</th>"
    body = []
    for bs, c in choice.items():
        cells = "".join(
            f"<td{' class=chosen' if x['lr'] == c['lr'] else ''}>"
            f"{with_ci({'v': x['val'], 'v_ci': x['val_ci']}, 'v')} ({x['reached']}/{x['n']})</td>" for x in c["by_lr"])
        body.append(f"<tr><td>{bs}</td>{cells}<td>{c['lr']:g}</td></tr>")
    edges = grid_edges(ctx, concl)
    warn = "".join(f"<p class=missed>The best rate of batch size {sizes_text(sizes)} is the grid's {side} "
                   f"({rate:g}): a {side} rate may be better still; widen train.lr_grid before trusting the "
                   f"comparison there.</p>" for side, (rate, sizes) in edges.items())
    return (f"<p>Each batch size at its own best learning rate, chosen on the validation split (steps to "
            f"{target_text(ctx)}, mean over seeds; in brackets: seeds that reached it). The test split plays no part.</p>"
            f"<div class=table-wrap><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            + warn)


def _steps(trial) -> str:
    v = trial["steps_to"]["headline"]
    return "missed" if v is None else f"{v:,.1f}"


def html(ctx: Context, rows, runs, concl, images: list[tuple[Path, str]], manifest, key: str = "",
         parent_url: str | None = None) -> str:
    p, task = ctx.params, manifest["task"]
    tags = ctx.run_tags()
    commit = tags.get("batchlab.code_commit", "none")[:12] + (" with uncommitted changes"
                                                             if tags.get("batchlab.git_dirty") == "true" else "")
    where = (f'MLflow: <a href="{html_lib.escape(parent_url)}">the parent run sweep-{key[:8]}</a>' if parent_url
             else f"MLflow: the parent run sweep-{key[:8]} (the store did not answer; "
                  f"<code>python -m pipeline ui-url</code> prints its view)")
    ident = f"Sweep key {key[:16]}, code commit {html_lib.escape(commit)}; {where}."
    lr = (f"lr per batch size from the grid {', '.join(f'{x:g}' for x in p.train.lr_grid)}" if p.train.lr_grid
          else "lr per batch size from a search" if p.train.searches() else f"lr {p.train.lr:g}")
    setup = (f"Data hash {manifest['data_hash'][:12]}, {manifest['splits']['train']['n']:,} training samples; "
             f"each run until {target_text(ctx)} or {p.train.max_steps:,} steps, {lr} (scaling: {p.train.lr_scaling}, "
             f"base batch {p.train.base_batch_size}, warm-up {p.train.warmup_epochs:g} epochs); "
             f"{'shuffled' if p.train.shuffle else 'not shuffled (control)'}; seeds "
             f"{', '.join(map(str, p.train.seeds))} ({len(runs)} runs shown"
             + (f", of {len(runs) * len(p.train.lr_grid)} trained" if p.train.lr_grid else "") + ").")
    cols = _columns(task)
    head = "<th>batch size</th>" + ("<th>lr</th>" if p.train.lr_grid else "") + "<th>reached</th>" \
        + "".join(f"<th>{html_lib.escape(label)}</th>" for _, label in cols)
    body = "\n".join(f"<tr><td>{r['batch_size']}</td>" + (f"<td>{r['lr']:g}</td>" if p.train.lr_grid else "")
                     + f"<td>{r['reached']}/{r['n']}</td>"
                     + "".join(f"<td>{_cell(concl, r, key)}</td>" for key, _ in cols) + "</tr>" for r in rows)
    checked = "\n".join(f"<tr><td>{html_lib.escape(c['claim'])}<div class=rule>rule: {html_lib.escape(c['rule'])}"
                        f"</div></td><td>{html_lib.escape(c['numbers'])}</td>"
                        f"<td class=verdict>{html_lib.escape(c['verdict'])}</td></tr>" for c in claims(ctx, rows, task, concl))
    figures = "\n".join(
        f'<figure><img alt="{img.stem.replace("_", " ")}" src="data:image/png;base64,'
        f'{base64.b64encode(img.read_bytes()).decode()}"><figcaption>{html_lib.escape(caption)}</figcaption></figure>'
        for img, caption in images)
    return Template(TEMPLATE.read_text()).substitute(
        title=html_lib.escape(f"{p.data.name} / {p.model.label} / {p.train.optimizer}"), setup=html_lib.escape(setup),
        ident=ident,
        recommendation=recommendation_text(ctx, concl, task, markup=True),
        conclusions="\n".join(f"<li>{b}</li>" for b in _bullets(ctx, concl, rows, runs)),
        claims=checked, critical=_critical_section(ctx, rows, concl), learning_rates=_lr_section(ctx, concl),
        table_head=head, table_body=body,
        glossary="\n".join(f"<dt>{html_lib.escape(k)}</dt><dd>{html_lib.escape(v)}</dd>" for k, v in GLOSSARY.items()),
        figures=figures)
