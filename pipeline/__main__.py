"""Command line: ``python -m pipeline VERB``. The same verbs as dvc.yaml stages and MLproject entry points."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# Large CPU tensors (the data set, the epoch's gather buffer) in transparent huge pages: torch's
# allocator asks the kernel for them (madvise) when this is set before its first allocation, and
# the batches' gather from random rows then misses the TLB far less (docs/performance.md).
# THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments get the same one-line error as bad parameters (``--help`` shows usage)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    ap = _OneLineParser(prog="python -m pipeline", description="batch-size experiments")
    sub = ap.add_subparsers(dest="verb", required=True, parser_class=_OneLineParser)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set train.lr=0.01 (repeatable)")
        return sp

    verb("check", "check the params, the network and the data's presence (the first stage)")
    verb("prepare", "prepare the data set")
    for name, help in (("train", "train at one batch size, once per seed"),
                       ("evaluate", "evaluate one trained batch size, every seed")):
        sp = verb(name, help)
        sp.add_argument("--batch-size", type=_positive_int, required=True)
    sub.choices["train"].add_argument("--seed", type=int, default=None,
                                      help="train this seed only (default: every seed of train.seeds)")
    verb("compare", "compare the sweep: table, plots, report")
    sp = verb("find-batch-size", "the largest batch size whose training step fits in memory")
    sp.add_argument("--start", type=_positive_int, default=1)
    sp.add_argument("--max", dest="limit", type=_positive_int, default=1 << 24)
    sp.add_argument("--memory-budget-mb", type=float, default=None,
                    help="CPU: the memory a step may use above the process's baseline (required on CPU)")
    sp = verb("reproduce", "re-run a recorded training run; exit 1 unless every step matches")
    sp.add_argument("run_id")
    verb("sync", "publish to MLflow what the sweep's outputs hold and the store lacks")
    sp = verb("ui-url", "print the URL that opens the sweep's comparison in `mlflow ui`")
    sp.add_argument("--base", default="http://127.0.0.1:5000", help="where `mlflow ui` serves")
    sp = verb("bench", "benchmark data paths and logging overhead (prints a table)")
    sp.add_argument("--batch-sizes", default="1,8,64,512,4096")
    sp.add_argument("--seconds", type=float, default=3.0, help="seconds per cell and batch size, split over the repeats")
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--json", dest="json_path", default=None)
    sp.add_argument("--ranks", type=int, default=2, help="data-parallel rows: ranks under torchrun (1: none)")
    sp.add_argument("--no-tracking", dest="tracking", action="store_false",
                    help="log nothing to MLflow (a machine without the store); the pipeline row then logs "
                         "nothing, and the logging and stage lines are left out")
    sp.add_argument("--no-images", dest="images", action="store_false",
                    help="skip the ImageFolder lines (tensor path vs DataLoader workers on PNG files)")
    sp.add_argument("--no-stages", dest="stages", action="store_false",
                    help="skip the stage-level lines (fixed cost per stage, MNIST-sized train stage)")
    return ap


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (allowed: positive integers)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive (allowed: positive integers)")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The artifacts a command reads back (reproduce) are a few kB: MLflow's progress bars for them
    # are noise. A user's own setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from .config import DataError, ParamsError, Unreachable, load_params
    from .core.signals import Interrupted, NonFiniteLoss
    from .procs import Busy, Stopped

    class OutOfMemory(Exception):  # the real one imports torch: only a verb that trains raises it
        pass
    if args.verb in ("train", "find-batch-size"):
        from .core.memory import OutOfMemory  # noqa: F811

    try:
        params = load_params(Path(args.params), args.overrides)
        from .context import Context
        ctx = Context.from_environment(params, Path(args.params))
        if str(ctx.workdir) not in sys.path:  # a user's _target_ lives in the project folder
            sys.path.insert(0, str(ctx.workdir))
        if args.verb in MODEL_VERBS:
            _check_model(ctx, args.verb)
        if args.verb in STAGES and "DVC_STAGE" in os.environ:  # DVC's stage command, not a shell's
            _stop_with_dvc(args.verb)
        if args.verb in STAGES and os.environ.get("RANK", "0") == "0":
            from .lock import hold
            hold(ctx.workdir, f"`python -m pipeline {args.verb}`", dvc_too="DVC_STAGE" not in os.environ)
        return VERBS[args.verb](args, ctx) or 0
    except (ParamsError, DataError, Unreachable, OutOfMemory, NonFiniteLoss, Busy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ParamsError, DataError)) else 3 if isinstance(err, Busy) else 1
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT
    except (Interrupted, Stopped) as err:
        then = "a checkpoint was kept, rerun the same command to resume" if isinstance(err, Interrupted) \
            else "rerun the same command"
        print(f"interrupted: {err}; {then}", file=sys.stderr)
        return 128 + err.signum
    except Exception as err:
        # Anything else (a store that refuses a request, a bug): one line unless asked for more.
        if os.environ.get("BATCHLAB_DEBUG"):
            raise
        text = " ".join(str(err).split())[:400]
        print(f"error: {type(err).__name__}: {text} (BATCHLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _stop_with_dvc(verb: str) -> None:
    """Every stage ends with the `dvc repro` that started it: an orphan would go on writing
    outputs that the next `dvc repro` deletes and rewrites. The trainer stops at its next step
    boundary with a checkpoint (its own handler); the other stages keep nothing, so SIGTERM ends
    them where they are, through their context managers (a run they opened ends KILLED)."""
    from .procs import Stopped, stop_with_parent
    if verb != "train":
        def stop(signum, frame):
            signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process outright
            raise Stopped(signum)
        signal.signal(signal.SIGTERM, stop)
    stop_with_parent()


def _check_model(ctx, verb: str) -> None:
    """A network or data set named by the user is checked before any work (one line if wrong)."""
    from .config import BUILTIN_MODELS
    if verb == "prepare" and ctx.params.data.target is not None:
        from .core.sources import check_data
        check_data(ctx.params.data, ctx.workdir)
    p = ctx.params.model
    if p.target is None and p.name in BUILTIN_MODELS:
        return  # nothing to import: the fast path stays free of torch
    from .core.models import check_model
    check_model(p, ctx.workdir, build=verb in ("prepare", "train"))


# One function per verb; each imports only the modules its verb runs (dvc.yaml's deps are
# derived from those imports by a test).

def _check(args, ctx) -> None:
    from .stages import check
    check.run(ctx)


def _prepare(args, ctx) -> None:
    from .stages import prepare

    def network_takes_it(task: str, splits: dict) -> None:
        """The network runs one forward and backward pass on the data's real shape, or nothing is written."""
        import torch
        from .core.models import check_forward
        x = splits["train"][0]
        n_out = int(max(int(y.max()) for _, y in splits.values()) + 1) if task == "classification" else 1
        check_forward(ctx.params.model, tuple(x.shape[1:]), n_out, task, torch.from_numpy(x[:2]))
    manifest = prepare.run(ctx, network_takes_it)
    print(f"prepared {ctx.params.data.name}: " + ", ".join(
        f"{k} {v['n']}" for k, v in manifest["splits"].items()) + f", samples of shape {manifest['sample_shape']}"
        f" -> {ctx.data_dir}")


def _train(args, ctx) -> None:
    from .stages import train
    ctx = _own_sweep(ctx, args.batch_size)
    seeds = (args.seed,) if args.seed is not None else None
    executor = train
    if ctx.params.executor.name == "ray":
        from .stages import remote as executor  # Ray is imported only when asked for
        executor.check(ctx, args.batch_size)
    searched = train.search(ctx, args.batch_size)
    if searched is not None:
        from .stages.lr_search import line
        print(line(searched))
    for summary in executor.run(ctx, args.batch_size, seeds=seeds, lr=searched and searched["chosen"]):
        if os.environ.get("RANK", "0") == "0":
            print(_train_line(summary))
    if searched is not None and seeds is None:
        from .stages.lr_search import done
        done(ctx, args.batch_size)


def _own_sweep(ctx, batch_size: int):
    """A batch size outside train.batch_sizes (a training started by hand, e.g. under torchrun) is a
    sweep of its own, with its own parent run: a sweep's parent holds only the runs its comparison
    describes, so it never joins the list's sweep."""
    import dataclasses
    train = ctx.params.train
    if batch_size in train.batch_sizes:
        return ctx
    from .context import OUT_DIR
    own = ctx.workdir / OUT_DIR / "by-hand"  # not under outputs/train: DVC's stages neither read nor remove it
    if os.environ.get("RANK", "0") == "0":
        print(f"batch size {batch_size} is not in train.batch_sizes {list(train.batch_sizes)}: a sweep of its own "
              f"(its own parent run in MLflow, its files in {own.relative_to(ctx.workdir)}/), not part of that "
              f"list's", file=sys.stderr)
    params = ctx.params.model_copy(update={"train": train.model_copy(update={"batch_sizes": (batch_size,)})})
    return dataclasses.replace(ctx, params=params, outputs=own)


def _evaluate(args, ctx) -> None:
    from .stages import evaluate
    ctx = _own_sweep(ctx, args.batch_size)
    for metrics in evaluate.run(ctx, args.batch_size):
        print("evaluated bs={} seed={}: {}".format(args.batch_size, metrics["seed"], ", ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))))


def _compare(args, ctx) -> None:
    from .stages import compare
    result = compare.run(ctx)
    print(f"compared {len(result['rows'])} batch sizes -> {ctx.compare_dir / 'report.html'}")


def _find_batch_size(args, ctx) -> int:
    from .tools import find_batch_size
    found = find_batch_size.run(ctx, args.start, args.limit, args.memory_budget_mb)
    if found.largest is None:
        first = found.trials[0]
        print(f"no batch size from {args.start} fits: batch size {args.start} already needs "
              f"{first.peak_bytes / 2**20:,.1f} MiB ({first.note or 'over budget'})", file=sys.stderr)
        return 3
    whole = " (the whole training split: a larger batch is never needed)" if found.largest == found.capped_at else ""
    print(f"largest batch size that fits: {found.largest}{whole} (peak {find_batch_size.mib(found.peak_bytes)}, "
          f"{len(found.trials)} trials)")
    knee, knees = found.knee(), found.knees()
    if knee is not None and len(set(knees)) > 1:
        print(f"where throughput stops rising is uncertain: {len(knees)} repeated measurements put it at batch "
              f"size {', '.join(map(str, knees))}; the timings swing more than the 10 % that tells sizes apart "
              f"(measure on a quieter machine)")
    elif knee is not None:
        best = max(t.samples_per_s for t in found.trials if t.fits and t.samples_per_s)
        print(f"throughput stops rising at batch size {knee}: within 10 % of the best measured "
              f"({best:,.0f} samples/s, the median of {len(knees)} repeats, each putting it there); larger "
              f"batches buy memory use, not speed")
    return 0


def _reproduce(args, ctx) -> int:
    from .tools.reproduce import Refused, run as reproduce
    try:
        return 0 if reproduce(ctx, args.run_id) else 1
    except Refused as err:
        print(f"refused: {err}", file=sys.stderr)
        return 3


def _sync(args, ctx) -> int:
    from .tracking.uri import project_root, tracking_uri
    from .core.models import rebuild_trained
    from .tracking.sweep import publish_sweep
    done = publish_sweep(ctx, rebuild_trained)
    uri = tracking_uri(project_root(ctx.workdir), ctx.env)
    if done is None:
        print(f"error: sync: {uri} did not take the records (above); the outputs are kept, run sync again "
              f"once it answers", file=sys.stderr)
        return 4
    print(f"sync: {uri} holds the sweep's {done['runs']} training runs ({done.get('evaluated', 0)} evaluated)"
          + (f"; closed {done['closed']} left RUNNING by a dead trainer" if done.get("closed") else ""))
    return 0


def _ui_url(args, ctx) -> None:
    """The view of the sweep that params.yaml and the prepared data describe, once it exists in
    the store; else the view of every run in the experiment."""
    from .config import DataError
    from .context import read_manifest
    from .tracking.sweep import open_view
    view = open_view(ctx, quiet=True)
    if view is None:
        return
    try:
        key = ctx.params.sweep_key(read_manifest(ctx.data_dir)["data_hash"])
    except (DataError, KeyError):  # no prepared data here yet
        key = None
    print(view.ui_url(args.base, key if key and view.sweep_runs(key) else None))


def _bench(args, ctx) -> None:
    from .tools import bench
    bench.main(ctx, args)


STAGES = ("check", "prepare", "train", "evaluate", "compare")
MODEL_VERBS = ("prepare", "train", "evaluate", "find-batch-size")
VERBS = {"check": _check, "prepare": _prepare, "train": _train, "evaluate": _evaluate, "compare": _compare,
         "find-batch-size": _find_batch_size, "reproduce": _reproduce, "bench": _bench, "sync": _sync, "ui-url": _ui_url}


def _train_line(s: dict) -> str:
    acc = s.get("final_val_acc")
    return (f"trained bs={s['batch_size']} seed={s['seed']}: {s['steps']} steps, {s['throughput']:.0f} samples/s, "
            f"val_loss {s['final_val_loss']:.4g}" + (f", val_acc {acc:.4f}" if acc is not None else ""))


def console() -> None:
    """The ``batchlab`` command an installed package provides: the same as ``python -m pipeline``."""
    from .procs import end_after_exit_handlers, exit_now
    end_after_exit_handlers()  # first, so that it runs after every handler registered later
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    exit_now(main())


if __name__ == "__main__":
    console()
