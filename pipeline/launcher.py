"""MLproject entry points: ``ENTRY [--params F] [--batch-size N] key=value ...``.

`mlflow run .` is a second front door to the one DVC pipeline, not a second implementation:
with no parameter set it runs ``dvc repro [stage]``, with some it runs
``dvc exp run -S key=value ... [stage]``, so dvc.lock records what was produced and
`dvc status` agrees afterwards. The run `mlflow run` made (MLFLOW_RUN_ID, passed through DVC to
the stages) becomes the parent of a new sweep. When DVC finds the sweep already done (up to date,
or restored from its run-cache) nothing trains, and that run is tagged as pointing to the
sweep's existing parent instead. One launcher at a time per workspace (``pipeline.lock``).

MLflow substitutes every parameter, empty ones too; ``key=`` (no value) means "keep params.yaml".
Entry points that are not pipeline stages (find-batch-size, reproduce) run the CLI directly.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .__main__ import main as cli
from .config import BUILTIN_MODELS, DataError, ParamsError, load_params

STAGE_ENTRIES = ("main", "prepare", "train", "evaluate", "compare")


def translate(argv: list[str]) -> list[str]:
    """``key=value`` -> ``--set key=value`` for the CLI; empty values are dropped."""
    out: list[str] = []
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            if value.strip():
                out += ["--set", f"{key}={value}"]
        else:
            out.append(arg)
    return out


def _hydra_value(value) -> str:
    """A params value in the override grammar `dvc exp run -S` reads."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value) if any(c in value for c in " ,[]{}=:'\"") or not value else value
    return str(value)


def _keys_in(path: Path) -> set[str]:
    import yaml
    raw = yaml.safe_load(path.read_text()) or {}
    return {f"{s}.{k}" for s, keys in raw.items() if isinstance(keys, dict) for k in keys}


def dvc_command(entry: str, params_file: str, batch_size: int | None, sets: list[str]) -> list[str]:
    """The DVC command for an entry point. Values are validated first (one-line errors before
    DVC starts) and passed on as validated, in DVC's override grammar."""
    overrides = [s for s in sets if s.split("=", 1)[1].strip()]
    base = load_params("params.yaml")
    removed: list[str] = []
    if Path(params_file) != Path("params.yaml"):
        # The file describes a whole configuration: what it does not name is the project's default,
        # not what the last experiment left in params.yaml (a network's keyword it does not take).
        named = load_params(params_file).flat()
        removed = [k for k in base.flat() if k not in named]
        overrides = [f"{k}={json.dumps(v)}" for k, v in named.items() if base.flat().get(k) != v] + overrides
        params = load_params(params_file, [s for s in sets if s.split("=", 1)[1].strip()])
    else:
        params = load_params("params.yaml", overrides)
    from .core.datasets import check_present  # what the check stage checks, before `mlflow run` makes a run
    check_present(params.data)
    if params.model.target is not None or params.model.name not in BUILTIN_MODELS:
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        from .core.models import check_model
        check_model(params.model, Path.cwd(), build=True)
    flat, changed = params.flat(), dict.fromkeys(o.split("=", 1)[0] for o in overrides)
    in_file = _keys_in(Path("params.yaml"))
    # Hydra's grammar: a key params.yaml does not hold yet (a target's keyword) is added with "+".
    sets = [f"{'' if k in in_file else '+'}{k}={_hydra_value(flat[k])}"
            for k in changed if flat[k] != base.flat().get(k)] + [f"~{k}" for k in removed if k in in_file]
    target = {"main": [], "prepare": ["prepare"], "compare": ["compare"]}.get(entry)
    if target is None:
        if batch_size not in params.train.batch_sizes:
            raise ParamsError(f"batch_size={batch_size} is not in train.batch_sizes "
                              f"{list(params.train.batch_sizes)} (allowed: one of them; set -P batch_sizes=... "
                              f"on the main entry point to sweep others)")
        target = [f"{entry}@{batch_size}"]
    if not sets:
        return ["dvc", "repro", *target]
    return ["dvc", "exp", "run", *[a for o in sets for a in ("-S", o)], *target]


def publish(launch_run: str | None) -> None:
    """After DVC: publish what the store lacks (outputs DVC restored from its cache included); a
    run `mlflow run` made that did not become the sweep's parent is tagged to point to it."""
    from .context import Context
    from .core.models import rebuild_trained
    from .tracking.sweep import publish_sweep
    ctx = Context.from_environment(load_params("params.yaml"))
    ctx.parent_run_id = launch_run
    publish_sweep(ctx, rebuild_trained)


def _refused(note: str) -> None:
    """The run `mlflow run` made for a launch refused before any work is named and noted so.
    (`mlflow run` itself exits 1: its CLI maps any failed entry point to 1; this process's own
    exit status is 2.)"""
    if os.environ.get("MLFLOW_RUN_ID"):
        from .tracking.client import mark_refused
        mark_refused(os.environ["MLFLOW_RUN_ID"], note)


def launch_experiment() -> str | None:
    """The experiment `mlflow run` made its run in (MLFLOW_EXPERIMENT_ID), by name."""
    if not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return None
    from .tracking.client import experiment_name
    return experiment_name(os.environ["MLFLOW_EXPERIMENT_ID"])


# `dvc exp run` first checks out every output of the pipeline; for each one that dvc.lock holds no
# hash of yet (a new batch size, a first run) it warns "No file hash info found for '…'. It won't be
# created." There is nothing to act on: the stage then runs and makes it.
_NO_HASH = re.compile(r"^WARNING: No file hash info found for '.*'\. It won't be created\.$")


def _call_dvc(cmd: list[str]) -> int:
    """Runs DVC with its stderr passed through, less the lines above."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")
    while True:
        try:
            for line in proc.stderr:
                if not _NO_HASH.match(line.rstrip("\n")):
                    sys.stderr.write(line)
                    sys.stderr.flush()
            return proc.wait()
        except KeyboardInterrupt:  # DVC got the same Ctrl-C: read on until it has stopped
            continue


def run_stage_entry(argv: list[str]) -> int:
    entry, rest = argv[0], argv[1:]
    params_file, batch_size, sets = "params.yaml", None, []
    it = iter(rest)
    for arg in it:
        if arg == "--params":
            params_file = next(it)
        elif arg == "--batch-size":
            text = next(it)
            if not text.isdigit() or int(text) < 1:
                print(f"error: batch_size={text!r} is not a positive integer", file=sys.stderr)
                _refused(f"refused before any work: batch_size={text!r} is not a positive integer")
                return 2
            batch_size = int(text)
        else:
            sets.append(arg)
    try:
        named = launch_experiment()
        if named:  # --experiment-name: the sweep's view goes there, and params.yaml says so
            sets.append(f"tracking.experiment={named}")
        cmd = dvc_command(entry, params_file, batch_size, sets)
    except (ParamsError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        _refused(f"refused before any work: {err}")
        return 2
    from .procs import Busy
    from .lock import dvc_busy, hold
    try:
        hold(Path.cwd(), "`mlflow run`")
        if dvc_busy(Path.cwd()):
            raise Busy("DVC runs in this workspace (.dvc/tmp/lock is held); wait for it to end, then run "
                       "`mlflow run` again")
    except Busy as err:
        print(f"error: {err}", file=sys.stderr)
        _refused(f"refused before any work: {err}")
        return 3
    print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
    code = _call_dvc(cmd)
    if code == 0:
        publish(os.environ.get("MLFLOW_RUN_ID"))
    return code


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] in STAGE_ENTRIES:
        sys.exit(run_stage_entry(args))
    sys.exit(cli(translate(args)))
