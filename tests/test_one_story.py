"""DVC and MLflow tell one story: the real commands in a temporary git project, then the git
tree, `dvc status` and the MLflow store are read back and must agree."""
import shutil

import pytest
import yaml

from conftest import BIN, PLOTS_TEMPLATE, REPO, SMALL, check_published, env_for, make_project, merge, runs_of, sh

pytestmark = pytest.mark.slow

PARAMS = merge(SMALL, {"train": {"epochs": 1}})


def _uri(proj):
    return f"sqlite:///{proj / 'mlflow.db'}"


def _store(proj):
    """(parents, active training runs) of the project's store; nothing may be RUNNING."""
    client, runs = runs_of(_uri(proj))
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    return client, parents, children


def _git_status(proj) -> set[str]:
    return set(sh(["git", "status", "--porcelain"], proj).stdout.splitlines())


def _up_to_date(proj) -> bool:
    return "up to date" in sh(["dvc", "status"], proj).stdout


def _commit(proj, message):
    sh(["git", "add", "-A"], proj)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", message], proj)


def _set(proj, section, key, value):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params[section][key] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def clone(tmp_path):
    """A project as a clone has it: the Makefile and requirements too (timestamps kept, so that
    `make` finds this test run's environment already set up and installs nothing)."""
    proj = make_project(tmp_path / "clone", PARAMS, git=False)
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "requirements-ray.txt"):
        shutil.copy2(REPO / name, proj / name)
    shutil.copytree(REPO / "configs", proj / "configs")
    sh(["git", "init", "-q"], proj)
    sh(["dvc", "init", "-q"], proj)
    sh(["dvc", "config", "plots.html_template", PLOTS_TEMPLATE], proj)
    _commit(proj, "init")
    return proj


def test_make_run_then_the_documented_commands_keep_dvc_and_mlflow_agreeing(clone):
    """`make run`, then what the README walks through: nothing to do, reproduce a run, another
    learning rate, back to the baseline, an experiment with another batch-size list, a forced
    retrain. After each, git, `dvc status` and the store tell one story."""
    venv = BIN.parent
    child = _make_run(clone, venv)
    _reproduce(clone, child)
    _other_params_then_back(clone)
    _another_batch_size_list(clone)
    parents, children = _forced_retrain(clone)
    _clean_then_make_run(clone, venv, parents, children)


def _make_run(clone, venv) -> str:
    sh(["make", "run", f"VENV={venv}"], clone, timeout=900)
    # Nothing git tracks is touched; dvc.lock is the one new file; outputs are DVC's, not git's.
    assert _git_status(clone) == {"?? dvc.lock"}
    assert _up_to_date(clone)
    client, parents, children = _store(clone)
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["batchlab.git_dirty"] == "false" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert check_published(_uri(clone), clone)["train_runs"] == 2
    again = sh(["dvc", "repro"], clone)
    assert "Data and pipelines are up to date" in again.stdout and "Running stage" not in again.stdout

    return children[0].info.run_id


def _reproduce(clone, child):
    assert "reproduced exactly" in sh(["python", "-m", "pipeline", "reproduce", child], clone).stdout
    _commit(clone, "results")
    assert "reproduced exactly" in sh(["python", "-m", "pipeline", "reproduce", child], clone).stdout
    with (clone / "pipeline" / "core" / "models.py").open("a") as fh:
        fh.write("\n# a change\n")
    refused = sh(["python", "-m", "pipeline", "reproduce", child], clone, check=False)
    assert refused.returncode == 3 and "code differs" in refused.stderr
    sh(["git", "checkout", "pipeline/core/models.py"], clone)



def _other_params_then_back(clone):
    # Other params: a new sweep, and only the stages they shape run. Back to the first: restored
    # from DVC's run-cache, no new run.
    _set(clone, "train", "lr", 0.002)
    changed = sh(["dvc", "repro"], clone).stdout
    assert "Running stage 'prepare'" not in changed and "Running stage 'compare'" in changed
    _, parents, children = _store(clone)
    assert len(parents) == 2 and len(children) == 4
    sh(["git", "checkout", "params.yaml"], clone)
    back = sh(["dvc", "repro"], clone).stdout
    assert "Running stage 'train@" not in back
    _, parents, children = _store(clone)
    assert len(parents) == 2 and len(children) == 4
    assert _up_to_date(clone)
    assert _git_status(clone) <= {" M dvc.lock"}


def _another_batch_size_list(clone):
    # Another batch-size list is another sweep, each parent holding what its comparison describes.
    sh(["dvc", "exp", "run", "-S", "train.batch_sizes=[32]", "--name", "bs32"], clone)
    client, parents, children = _store(clone)
    assert len(parents) == 3
    for parent in parents:
        under = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        described = parent.data.tags["batchlab.batch_sizes"].split(",")
        assert sorted(c.data.params["batch_size"] for c in under) == sorted(described)
    assert [c.data.tags.get("dvc.exp_name") for c in children if c.data.params["batch_size"] == "32"] == ["bs32"]
    # The README's command compares them at 120 columns: changed params and conclusions, whole.
    env = env_for(clone) | {"COLUMNS": "120"}
    shown = sh(["dvc", "exp", "show", "--only-changed", "--drop", "Created|outputs/|data/|pipeline/", "--no-pager"],
               clone, env=env).stdout.splitlines()
    assert max(len(line) for line in shown) <= 120 and "…" not in "\n".join(shown)
    header = next(line for line in shown if "Experiment" in line)
    assert "train.batch_sizes" in header and "rec_bs" in header
    assert "rec_test_acc" in sh(["dvc", "metrics", "show", "--json"], clone).stdout
    sh(["dvc", "plots", "show"], clone)
    assert (clone / "dvc_plots" / "index.html").is_file()


def _forced_retrain(clone):
    # A deliberate retrain replaces the run of the same identity: one finished run per batch size.
    sh(["git", "checkout", "params.yaml"], clone)
    sh(["dvc", "repro", "-f", "-s", "train@16"], clone)
    sh(["dvc", "repro"], clone)
    _, parents, children = _store(clone)
    assert len(children) == 5
    # The experiment's bs32 folders are not this sweep's: they left the workspace, and dvc.lock's
    # compare stage records exactly the files the sweep's train and evaluate stages made.
    assert sorted(d.name for d in (clone / "outputs" / "train").iterdir()) == ["bs16", "bs64"]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    for stage in ("train", "evaluate"):
        dep = next(d for d in lock["compare"]["deps"] if d["path"] == f"outputs/{stage}")
        made = sum(lock[f"{stage}@{bs}"]["outs"][0]["nfiles"] for bs in (16, 64))
        assert dep["nfiles"] == made == sum(1 for f in (clone / "outputs" / stage).rglob("*") if f.is_file())
    assert _up_to_date(clone)
    first = next(p for p in parents if p.data.params["train.lr"] == "0.003" and p.data.params["train.batch_sizes"] == "16,64")
    under = [c for c in children if c.data.tags["mlflow.parentRunId"] == first.info.run_id]
    assert sorted(c.data.params["batch_size"] for c in under) == ["16", "64"]
    return parents, children


def _clean_then_make_run(clone, venv, parents, children):
    # `make clean && make run`: every stage, compare included, is restored from DVC's cache; the
    # store gains nothing; DVC's "Use `dvc push`" line is not shown.
    sh(["make", "clean"], clone)
    again = sh(["make", "run", f"VENV={venv}"], clone, timeout=900)
    # (The check stage's output persists, which DVC never restores from its run-cache: it runs
    # again, writing the same constant text, and so restores nothing less.)
    ran = [line for line in again.stdout.splitlines() if line.startswith("Running stage")
           and not line.startswith("Running stage 'check'")]
    assert not ran and "dvc push" not in again.stdout + again.stderr, again.stdout[-3000:]
    assert _up_to_date(clone) and (clone / "outputs" / "compare" / "report.html").is_file()
    _, parents_after, children_after = _store(clone)
    assert (len(parents_after), len(children_after)) == (len(parents), len(children))


def test_mlflow_run_goes_through_dvc_and_its_run_is_the_parent(clone):
    mlflow = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name", "test"]
    parent = _mlflow_run_sweep(clone, mlflow)
    _single_stage_of_a_done_sweep(clone, mlflow, parent)
    _bad_values_refused(clone, mlflow)
    _linear_example_then_back(clone, mlflow, parent)


def _mlflow_run_sweep(clone, mlflow):
    out = sh(mlflow + ["-P", "batch_sizes=16,64", "-P", "lr=0.002"], clone, timeout=900)
    assert "dvc exp run -S train.lr=0.002" in out.stderr and "succeeded" in out.stderr
    # Quiet: DVC's warning for each output not made yet ("… It won't be created") is not passed on.
    assert "won't be created" not in out.stderr and "Running stage 'train@16'" in out.stdout
    assert _up_to_date(clone)  # DVC recorded what `mlflow run` produced
    client, parents, children = _store(clone)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.data.params["lr"] == "0.002" and parent.data.params["train.lr"] == "0.002"
    assert parent.data.tags["mlflow.runName"] == f"sweep-{parent.data.tags['batchlab.sweep_key'][:8]}"
    assert parent.data.tags.get("mlflow.project.entryPoint") == "main"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} >= {"compare/report.html"}
    return parent


def _single_stage_of_a_done_sweep(clone, mlflow, parent):
    # A single stage of a sweep already done: nothing trains, its run points to the parent.
    sh(mlflow + ["-e", "train", "-P", "batch_size=16"], clone)
    client, runs = runs_of(_uri(clone))
    launch = [r for r in runs if r.data.tags.get("batchlab.role") == "launch"]
    # It nests under the sweep: the experiment's top level holds sweeps only.
    assert len(launch) == 1 and launch[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert len(_store(clone)[2]) == 2


def _bad_values_refused(clone, mlflow):
    # Bad values stop before any work, with one line; the run `mlflow run` made says why.
    for bad_value, said in (("params_file=nosuch.yaml", "'nosuch.yaml' not found"), ("lr=-1", "train.lr")):
        bad = sh(mlflow + ["-P", bad_value], clone, check=False)
        assert bad.returncode == 1  # MLflow's CLI: 1 for any failed entry point; the launcher's own is 2
        assert said in bad.stderr and "running: dvc" not in bad.stderr
    client, runs = runs_of(_uri(clone))
    refused = [r for r in runs if r.data.tags.get("batchlab.role") == "refused"]
    assert [r.info.run_name for r in refused] == ["refused-launch"] * 2
    assert sorted(said in r.data.tags["mlflow.note.content"] for r in refused for said in ("nosuch.yaml", "train.lr")) \
        == [False, False, True, True]
    assert len(_store(clone)[2]) == 2 and _up_to_date(clone)


def _linear_example_then_back(clone, mlflow, parent):
    # The README's linear example (fewer epochs), then back to the baseline: its batch sizes'
    # folders leave the workspace and dvc.lock, every training stage is restored, nothing new
    # reaches the store.
    sh(["git", "add", "dvc.lock", "params.yaml"], clone)  # the -P values above stay in params.yaml: the baseline
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "sweep"], clone)
    out = sh(mlflow + ["-P", "params_file=configs/linear.yaml", "-P", "epochs=3"], clone, timeout=900)
    assert "won't be created" not in out.stderr
    assert sorted(d.name for d in (clone / "outputs" / "train").iterdir()) == ["bs1", "bs10"]
    client, runs = runs_of(_uri(clone))
    linear = [r for r in runs if r.data.tags.get("batchlab.role") == "train" and r.data.params["data.name"] == "linear"]
    assert len(linear) == 6 and {r.data.tags["mlflow.parentRunId"] for r in linear} != {parent.info.run_id}
    before = len(runs)
    sh(["git", "checkout", "params.yaml", "dvc.lock"], clone)  # the README's way back
    back = sh(["dvc", "checkout"], clone)
    assert "dvc push" not in back.stdout + back.stderr
    assert sorted(d.name for d in (clone / "outputs" / "train").iterdir()) == ["bs16", "bs64"]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == ["check", "compare", "evaluate@16", "evaluate@64", "prepare", "train@16", "train@64"]
    dep = next(d for d in lock["compare"]["deps"] if d["path"] == "outputs/train")
    assert dep["nfiles"] == sum(lock[f"train@{bs}"]["outs"][0]["nfiles"] for bs in (16, 64))
    assert _up_to_date(clone) and len(runs_of(_uri(clone))[1]) == before
    # compare may run again (DVC hashes its whole-folder deps before it prunes the linear sizes'
    # folders), but it makes the same files: dvc.lock is the committed one.
    assert " M dvc.lock" not in _git_status(clone) and "M  dvc.lock" not in _git_status(clone)


def test_params_file_changed_while_a_stage_runs_fails_the_stage(ctx_factory, tmp_path):
    """dvc.lock must never record params a model was not trained with."""
    from pipeline.stages import prepare, train
    from pipeline.config import ParamsError
    from pipeline.context import file_digest

    ctx = ctx_factory({"train": {"batch_sizes": [64], "epochs": 1}})
    prepare.run(ctx)
    path = tmp_path / "params.yaml"
    path.write_text("train: {lr: 0.003}\n")
    ctx.params_file, ctx.params_digest = path, file_digest(path)
    path.write_text("train: {lr: 0.005}\n")  # edited while the stage runs
    with pytest.raises(ParamsError, match="changed while train@64 ran"):
        train.run(ctx, 64)
    assert not ctx.train_dir(64).exists()  # no seed's folder either
    _, runs = runs_of(f"sqlite:///{ctx.workdir / 'mlflow.db'}")
    run = next(r for r in runs if r.data.tags.get("batchlab.role") == "train")
    assert run.info.status == "FAILED" and "changed while" in run.data.tags["batchlab.end_reason"]


def test_tools_log_to_their_own_experiments_and_usage_errors_make_no_run(ctx_factory):
    from pipeline.stages import prepare
    from pipeline.tools import find_batch_size
    from pipeline.config import ParamsError

    ctx = ctx_factory()
    prepare.run(ctx)
    with pytest.raises(ParamsError):
        find_batch_size.run(ctx, 8, 4, 100.0)  # start > max
    client, _ = runs_of(f"sqlite:///{ctx.workdir / 'mlflow.db'}")
    assert client.get_experiment_by_name("test-find-batch-size") is None
    find_batch_size.run(ctx, 256, 512, 10_000.0)
    _, runs = runs_of(f"sqlite:///{ctx.workdir / 'mlflow.db'}", "test-find-batch-size")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    _, sweep_runs = runs_of(f"sqlite:///{ctx.workdir / 'mlflow.db'}")
    assert {r.data.tags.get("batchlab.role") for r in sweep_runs} == {"sweep"}
