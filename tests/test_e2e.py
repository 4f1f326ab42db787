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
    # The README's way: workers started in the background, then waited for. (`dvc exp run
    # --run-all` waits for its workers to exit, and a DVC worker sometimes stays up after its
    # queue emptied: a wait with no end that is DVC's, not this project's.)
    import time
    sh(["dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = sh(["dvc", "queue", "status"], project).stdout
        if status.count("Success") == 2 or "Failed" in status:
            break
        time.sleep(2)
    sh(["dvc", "queue", "stop", "--kill"], project, check=False)
    assert status.count("Success") == 2, status
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


def test_bad_values_through_dvc_exp_run_delete_no_output_and_a_hand_run_stays_apart(project):
    """The README's main door: each bad value stops at the first stage (check), before DVC removes
    any other stage's outputs as it starts it: the same files, byte for byte, after each. Then a
    training by hand outside the sweep's list."""
    sh(["dvc", "repro"], project, timeout=600)

    def files():
        return {p: p.read_bytes() for p in sorted((project / "outputs").rglob("*")) + sorted(
            (project / "data" / "prepared").rglob("*")) if p.is_file()}
    before = files()
    assert len(before) > 20
    bad = {"+train.ephocs=5": "unknown key 'train.ephocs'",
           "model._target_=nosuch.Net": "no module 'nosuch'",
           "model._target_=os.system": "not known to make a network",
           "data.name=imagefolder": "train/ not found",
           "train.lr=-1": "train.lr=-1"}
    for value, needle in bad.items():
        proc = sh(["dvc", "exp", "run", "-S", value], project, check=False, timeout=300)
        assert proc.returncode != 0 and needle in proc.stderr + proc.stdout, (value, proc.stderr[-1500:])
        assert files() == before, value
        sh(["git", "checkout", "params.yaml"], project)
    assert "up to date" in sh(["dvc", "status"], project).stdout
    _a_hand_run_batch_size_outside_the_list_is_a_sweep_of_its_own(project)


def _a_hand_run_batch_size_outside_the_list_is_a_sweep_of_its_own(project):
    """After the sweep, a training by hand at a batch size the list does not hold (the README's
    torchrun line does this at 512): it gets a parent of its own, and the sweep's parent and view
    still hold exactly the sweep's runs."""
    proc = sh(["python", "-m", "pipeline", "train", "--batch-size", "32"], project, timeout=600)
    assert "not in train.batch_sizes [16, 64]" in proc.stderr
    _, runs = runs_of(_uri(project))
    parents, children = _roles(runs)
    assert len(parents) == 2 and len(children) == 3
    by_parent = {p.info.run_id: sorted(c.data.params["batch_size"] for c in children
                                       if c.data.tags["mlflow.parentRunId"] == p.info.run_id) for p in parents}
    assert sorted(by_parent.values()) == [["16", "64"], ["32"]]
    baseline = next(p for p in parents if by_parent[p.info.run_id] == ["16", "64"])
    key = baseline.data.tags["batchlab.sweep_key"]
    assert sorted(c.data.params["batch_size"] for c in children if c.data.tags["batchlab.sweep_key"] == key) == ["16", "64"]
    # Its files are beside the sweep's, where no stage reads or removes them.
    assert (project / "outputs/by-hand/train/bs32/seed0/model.pt").is_file()
    assert not (project / "outputs/train/bs32").exists()
    assert "up to date" in sh(["dvc", "status"], project).stdout
    sh(["dvc", "repro"], project)
    assert (project / "outputs/by-hand/train/bs32/seed0/model.pt").is_file()


def test_the_readme_params_in_sequence_leave_a_params_yaml_that_reads_back(project, monkeypatch):
    """Every documented `-S` and `-P` one after the other, each through DVC's own rewrite of
    params.yaml (the check stage alone runs), the file read back after each: it stays valid YAML
    (a comment after a list broke DVC's second rewrite), and a params file describes a whole
    configuration (cifar10's model.width did not leak into the imagefolder example)."""
    import shutil
    import sys
    from conftest import REPO
    from pipeline.config import load_params
    from pipeline.launcher import dvc_command
    for folder in ("configs", "examples"):
        shutil.copytree(REPO / folder, project / folder)
    shutil.copy(REPO / "params.yaml", project / "params.yaml")  # its comments: what DVC rewrites
    for kind, where in (("cifar10", "data/raw"), ("imagefolder", "data/raw/stripes")):
        sh([sys.executable, "-m", "pipeline.tools.samplefiles", kind, where], project)
    monkeypatch.chdir(project)

    def apply(cmd):
        sh([*cmd, "check"], project, timeout=300)
        return load_params(project / "params.yaml")  # reads back, and validates
    p = apply(["dvc", "exp", "run", "-S", "train.lr=0.01"])
    assert p.train.lr == 0.01
    p = apply(dvc_command("main", "params.yaml", None, ["train.batch_sizes=8,64", "train.lr=0.02"]))
    assert p.train.batch_sizes == (8, 64) and p.train.lr == 0.02
    p = apply(dvc_command("main", "configs/linear.yaml", None, []))
    assert p.model.name == "linear" and p.model.hidden_sizes == () and p.train.batch_sizes == (1, 10)
    p = apply(dvc_command("main", "configs/cifar10.yaml", None, []))
    assert p.model.kwargs.get("width") is not None
    p = apply(dvc_command("main", "configs/imagefolder.yaml", None, []))
    assert p.model.name == "resnet18" and p.model.target is None and "width" not in p.model.kwargs
    p = apply(dvc_command("main", "params.yaml", None, ["model.hidden_sizes=[16,8]", "train.seeds=[0]"]))
    assert p.model.hidden_sizes == (16, 8) and p.train.seeds == (0,)
