"""The real commands, as a user types them: dvc repro / exp run, mlflow run, the CLI."""
from pathlib import Path

import yaml

from conftest import runs_of, sh
import pytest

pytestmark = pytest.mark.slow


def _uri(proj: Path) -> str:
    return f"sqlite:///{proj / 'mlflow.db'}"


def _roles(runs):
    parents = [r for r in runs if r.data.tags.get("batchlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("batchlab.role") == "train"]
    return parents, children


def test_dvc_repro_then_noop_then_param_change_then_experiment(project):
    first = sh(["dvc", "repro"], project)
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'compare'" in first.stdout
    client, runs = runs_of(_uri(project))
    parents, children = _roles(runs)
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    for child in children:
        bs = int(child.data.params["batch_size"])
        steps = int(child.data.params["total_steps"])
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == steps
        assert steps == 2 * -(-1257 // bs)
    assert (project / "outputs" / "compare" / "report.html").is_file()

    again = sh(["dvc", "repro"], project)
    assert "Data and pipelines are up to date" in again.stdout
    assert "Running stage" not in again.stdout

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = sh(["dvc", "repro"], project)
    assert "Running stage 'prepare'" not in changed.stdout
    for stage in ("train@16", "train@64", "evaluate@16", "evaluate@64", "compare"):
        assert f"Running stage '{stage}'" in changed.stdout
    _, runs = runs_of(_uri(project))
    parents, children = _roles(runs)
    assert len(parents) == 2 and len(children) == 4

    sh(["git", "add", "-A"], project)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "lr"], project)
    sh(["dvc", "exp", "run", "-S", "train.lr=0.01", "--name", "lr-high"], project)
    shown = sh(["dvc", "exp", "show", "--csv"], project).stdout
    assert "lr-high" in shown and "best_acc" in shown
    _, runs = runs_of(_uri(project))
    tagged = [r for r in runs if r.data.tags.get("dvc.exp_name") == "lr-high"]
    assert len([r for r in tagged if r.data.tags.get("batchlab.role") == "train"]) == 2
    assert all(r.info.status == "FINISHED" for r in runs)

    metrics = sh(["dvc", "metrics", "show", "--json"], project).stdout
    assert "best_acc" in metrics
    sh(["dvc", "plots", "show"], project)
    assert (project / "dvc_plots" / "index.html").is_file()


def test_mlflow_run_makes_its_run_the_sweep_parent(project):
    out = sh(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "test",
              "-P", "batch_sizes=16,64", "-P", "lr=0.002"], project)
    client, runs = runs_of(_uri(project))
    parents, children = _roles(runs)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.data.params["lr"] == "0.002"  # logged by `mlflow run` itself
    assert parent.data.params["train.lr"] == "0.002"
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.params["batch_size"] for c in children} == {"16", "64"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} >= {"compare/report.html"}
    assert "succeeded" in out.stderr

    child = children[0].info.run_id
    same = sh(["python", "-m", "pipeline", "reproduce", child], project)
    assert "reproduced exactly" in same.stdout
    with (project / "pipeline" / "core" / "models.py").open("a") as fh:
        fh.write("\n# a change\n")
    refused = sh(["python", "-m", "pipeline", "reproduce", child], project, check=False)
    assert refused.returncode == 3 and "code differs" in refused.stderr
    sh(["git", "checkout", "pipeline/core/models.py"], project)

    sh(["mlflow", "run", ".", "--env-manager", "local", "--experiment-name", "test", "-e", "prepare"], project)
    _, runs = runs_of(_uri(project))
    assert len([r for r in runs if r.info.status == "FINISHED"]) == len(runs)


def test_bad_input_is_one_line_nonzero_and_leaves_nothing(project):
    proc = sh(["python", "-m", "pipeline", "train", "--batch-size", "16", "--set", "train.lr=-1"],
              project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "train.lr=-1" in proc.stderr and "greater than 0" in proc.stderr
    assert not (project / "outputs").exists() and not (project / "mlflow.db").exists()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["optimizer"] = "lion"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = sh(["dvc", "repro"], project, check=False)
    assert proc.returncode != 0
    assert "train.optimizer='lion'" in proc.stderr + proc.stdout
    assert not (project / "data" / "prepared").exists()

    proc = sh(["python", "-m", "pipeline", "train", "--batch-size", "0"], project, check=False)
    assert proc.returncode == 2 and "not positive" in proc.stderr

    params["train"]["optimizer"] = "adam"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = sh(["python", "-m", "pipeline", "train", "--batch-size", "16"], project, check=False)
    assert proc.returncode == 2 and "run the prepare stage first" in proc.stderr
    if (project / "mlflow.db").exists():
        _, runs = runs_of(_uri(project))
        assert not [r for r in runs if r.info.status == "RUNNING"]


def test_queued_experiments_run_in_parallel_and_land_in_the_project_store(tmp_path):
    from conftest import SMALL, make_project, merge
    project = make_project(tmp_path / "q", merge(SMALL, {"train": {"epochs": 1}}))
    sh(["dvc", "exp", "run", "--queue", "-S", "train.batch_sizes=[16]", "-S", "train.lr=0.002", "--name", "q-a"], project)
    sh(["dvc", "exp", "run", "--queue", "-S", "train.batch_sizes=[64]", "-S", "train.lr=0.003", "--name", "q-b"], project)
    sh(["dvc", "exp", "run", "--run-all", "--jobs", "2"], project, timeout=900)
    shown = sh(["dvc", "exp", "show", "--csv"], project).stdout
    assert "q-a" in shown and "q-b" in shown
    # The stages ran in copies under .dvc/tmp/exps; the runs are in the user's store all the same.
    client, runs = runs_of(_uri(project))
    parents, children = _roles(runs)
    assert len(parents) == 2 and len(children) == 2
    by_exp = {c.data.tags["dvc.exp_name"]: c for c in children}
    assert set(by_exp) == {"q-a", "q-b"}
    assert by_exp["q-a"].data.params["batch_size"] == "16"
    for child in children:
        parent = next(p for p in parents if p.info.run_id == child.data.tags["mlflow.parentRunId"])
        assert parent.data.params["train.lr"] == child.data.params["train.lr"]
        assert child.info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db"))
