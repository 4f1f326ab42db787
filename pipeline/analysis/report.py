"""The sweep's HTML report (markup in templates/report.html): the answer first, then the table
with intervals, the claims, the critical batch size, the learning rates and the plots."""
from __future__ import annotations

import base64
import html as html_lib
from pathlib import Path
from string import Template
from typing import Any

from ..context import Context
from .claims import claims, critical_story, grid_edges, recommendation_text, sizes_text, target_text, with_ci

TEMPLATE = Path(__file__).with_name("templates") / "report.html"


GLOSSARY = {
    "± (every figure)": "mean over the seeds and the half-width of its 95 % confidence interval (Student's t); "
                        "two batch sizes differ only where their intervals do not overlap; the plots cut an interval "
                        "at what the figure can be (0, and 1 for an accuracy)",
    "samples/s": "the batch size over the median optimizer step's seconds: the steady rate (validation, start-up "
                 "and checkpoints excluded); overall_throughput in runs.csv is all samples over all step time",
    "time / steps to target": "at the first validation point reaching the target; given only when every seed "
                              "reached it (reached: how many did)",
    "step memory": "what one training step holds for its batch (batch, saved activations, outputs)",
    "loss spread": "standard deviation of the per-step training loss over the last epoch, relative to its mean",
    "noise scale": "final B_simple = tr(Σ)/|G|², the gradient noise scale; near convergence the gradient "
                   "is small and its unbiased estimate |G|² can fall to zero or below, so a negative or huge "
                   "value (or interval) means the run ended where it is not measurable; the critical-batch-size "
                   "check uses its value where the target was reached (noise at target), not the final one",
}


def _columns(task: str) -> list[tuple[str, str]]:
    """The table's columns: the answer's figures first (a regression's fitted w and b beside its
    score, where the tutorial's example is checked), so that the page reads at 1,000 px."""
    if task == "classification":
        head = [("test_acc", "test accuracy")]
        tail = [("loss_noise", "loss spread"), ("noise_at_target", "noise scale at target")]
    else:
        head = [("test_mse", "test MSE"), ("weight", "fitted w"), ("bias", "fitted b")]
        tail = []  # the loss spread is in the claims and sweep.csv
    return head + [("throughput", "samples/s"), ("time_to_target_s", "seconds to target"),
                   ("steps_to_target", "steps to target"), ("step_memory_bytes", "step memory")] + tail


def _bullets(ctx: Context, concl: dict[str, Any], rows) -> list[str]:
    acc, top, missed = concl["most_accurate"], concl["highest_throughput"], concl["missed_target"]
    score = "test_acc" if "test_acc" in acc else "test_mse"
    by = {r["batch_size"]: r for r in rows}
    if len(rows) < 2:
        best = f"{score} {with_ci(by[acc['batch_size']], score)} — the only batch size in this sweep"
    elif acc["ties"]:
        tied = sorted([acc["batch_size"], *acc["ties"]])
        best = (f"tied between batch sizes <b>{sizes_text(tied)}</b> (intervals overlap; best mean "
                f"{with_ci(by[acc['batch_size']], score)} at {acc['batch_size']})")
    else:
        best = (f"batch size <b>{acc['batch_size']}</b>, {with_ci(by[acc['batch_size']], score)} — its interval "
                f"separates it from every other batch size")
    fastest = concl["fastest_to_target"]
    if fastest is None:
        fast = f"Fastest to the target ({target_text(ctx)}): <b>no batch size reached it in every seed</b>."
    else:
        tied = sorted([fastest["batch_size"], *fastest["ties"]])
        fast = (f"Fastest to the target ({target_text(ctx)}): " + (
            f"tied between batch sizes {sizes_text(tied)} (intervals overlap)" if fastest["ties"] else
            f"batch size {fastest['batch_size']}") + f", {with_ci(by[fastest['batch_size']], 'time_to_target_s')} s "
            f"at {fastest['batch_size']}.")
    return [
        f"Test score: {best}.",
        fast,
        (f"<span class=missed>Missed the target within {ctx.params.train.epochs} epochs in at least one seed: batch "
         f"size {sizes_text(missed)}.</span>" if missed else "Every batch size reached the target in every seed."),
        f"Samples per second (steady steps): highest at batch size {top['batch_size']}, "
        f"{with_ci(by[top['batch_size']], 'throughput')}" + (f" (tied with {sizes_text(top['ties'])})" if top["ties"] else "")
        + ".",
    ]


def _lr_section(ctx: Context, concl) -> str:
    choice = concl.get("lr_choice")
    if not choice:
        return (f"<p>Every batch size trained at lr {ctx.params.train.lr:g}. A rate tuned for one batch size "
                f"favours it: set <code>train.lr_grid</code> (e.g. <code>dvc exp run -S "
                f"'train.lr_grid=[0.0005,0.001,0.002]'</code>) to judge each at its own best rate.</p>")
    metric = next(iter(choice.values()))["metric"].replace("final_", "final ")
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
    return (f"<p>Each batch size at its own best learning rate, chosen on the validation split ({metric}, mean "
            f"over seeds; in brackets: seeds that reached the target). The test split only judges the choice.</p>"
            f"<div class=table-wrap><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            + warn)


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
          else f"lr {p.train.lr:g}")
    setup = (f"Data hash {manifest['data_hash'][:12]}, {manifest['splits']['train']['n']:,} training samples; "
             f"{p.train.epochs} epochs, {lr} (scaling: {p.train.lr_scaling}, base batch "
             f"{p.train.base_batch_size}, warm-up {p.train.warmup_epochs:g} epochs); "
             f"{'shuffled' if p.train.shuffle else 'not shuffled (control)'}; seeds "
             f"{', '.join(map(str, p.train.seeds))} ({len(runs)} runs shown"
             + (f", of {len(runs) * len(p.train.lr_grid)} trained" if p.train.lr_grid else "") + ").")
    cols = _columns(task)
    head = "<th>batch size</th>" + ("<th>lr</th>" if p.train.lr_grid else "") + "<th>reached</th>" \
        + "".join(f"<th>{html_lib.escape(label)}</th>" for _, label in cols)
    body = "\n".join(f"<tr><td>{r['batch_size']}</td>" + (f"<td>{r['lr']:g}</td>" if p.train.lr_grid else "")
                     + f"<td>{r['reached']}/{r['n']}</td>"
                     + "".join(f"<td>{with_ci(r, key)}</td>" for key, _ in cols) + "</tr>" for r in rows)
    checked = "\n".join(f"<tr><td>{html_lib.escape(c['claim'])}<div class=rule>rule: {html_lib.escape(c['rule'])}"
                        f"</div></td><td>{html_lib.escape(c['numbers'])}</td>"
                        f"<td class=verdict>{html_lib.escape(c['verdict'])}</td></tr>" for c in claims(ctx, rows, task))
    figures = "\n".join(
        f'<figure><img alt="{img.stem.replace("_", " ")}" src="data:image/png;base64,'
        f'{base64.b64encode(img.read_bytes()).decode()}"><figcaption>{html_lib.escape(caption)}</figcaption></figure>'
        for img, caption in images)
    return Template(TEMPLATE.read_text()).substitute(
        title=html_lib.escape(f"{p.data.name} / {p.model.label} / {p.train.optimizer}"), setup=html_lib.escape(setup),
        ident=ident,
        recommendation=recommendation_text(ctx, concl, task, markup=True),
        conclusions="\n".join(f"<li>{b}</li>" for b in _bullets(ctx, concl, rows)),
        claims=checked, critical=critical_story(ctx, rows, concl), learning_rates=_lr_section(ctx, concl),
        table_head=head, table_body=body,
        glossary="\n".join(f"<dt>{html_lib.escape(k)}</dt><dd>{html_lib.escape(v)}</dd>" for k, v in GLOSSARY.items()),
        figures=figures)
