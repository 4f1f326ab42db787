"""Property-based: any CLI arguments either run or stop with one line — never a traceback,
never a RUNNING run, never a partial output file."""
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SMALL, make_project, merge, runs_of
from pipeline.__main__ import main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    proj = make_project(tmp_path_factory.mktemp("cli") / "p",
                        merge(SMALL, {"train": {"epochs": 1}}), git=False)
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        assert main(["prepare"]) == 0
    finally:
        os.chdir(cwd)
    return proj


overrides = st.lists(st.tuples(
    st.sampled_from(["train.lr", "train.epochs", "train.optimizer", "train.momentum", "train.seed",
                     "train.warmup_epochs", "train.lr_scaling", "train.eval_every_steps", "train.bogus",
                     "model.hidden_sizes", "tracking.max_points", "train.drop_last", "train.loader"]),
    st.one_of(st.sampled_from(["-1", "0", "1", "abc", "sgd", "adam", "sqrt", "[4]", "[0]", "true", "1e9",
                               "nan", "", "[]", "{a: 1}", "0.5"]))), max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.sampled_from(["0", "-3", "x", "64", "2000"]), sets=overrides)
def test_cli_runs_or_stops_with_one_line(prepared, capsys, batch, sets):
    args = ["train", "--batch-size", batch]
    for key, value in sets:
        args += ["--set", f"{key}={value}"]
    shutil.rmtree(prepared / "outputs", ignore_errors=True)
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's own refusal of --batch-size
            code = exc.code
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code in (0, 1, 2), err
    if code != 0:
        lines = [l for l in err.strip().splitlines() if not l.startswith("20")]  # MLflow's INFO lines
        assert len(lines) == 1 and "Traceback" not in err, err
    outputs = prepared / "outputs"
    if outputs.exists():
        leftovers = [p for p in outputs.rglob("*") if p.name.startswith(".")]
        assert not leftovers
        if code != 0:
            assert not list(outputs.rglob("summary.json"))
    if (prepared / "mlflow.db").exists():
        _, runs = runs_of(f"sqlite:///{prepared / 'mlflow.db'}")
        assert not [r for r in runs if r.info.status == "RUNNING"]


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")]


@pytest.mark.skipif(_thp_mode() != "madvise", reason="transparent huge pages are not in madvise mode here")
def test_the_cli_process_puts_large_tensors_in_huge_pages_unless_told_not_to():
    """Where the kernel gives huge pages on request (madvise), a process that loads the CLI has
    torch's allocator ask for them: a 32 MB tensor is backed by huge pages; with
    THP_MEM_ALLOC_ENABLE=0 in the environment it is not."""
    import subprocess
    import sys

    code = ("import pipeline.__main__, torch; x = torch.ones(1 << 23); "
            "print([l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env=env | {"THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, check=True)
    assert int(on.stdout) >= 2048 and int(off.stdout) == 0, (on.stdout, off.stdout)


def test_mlflow_run_without_env_manager_builds_the_pinned_requirements():
    """A bare `mlflow run .` (pyenv present) builds its virtualenv from python_env.yaml: the
    MLproject names it, and its dependencies are exactly the pins of requirements.txt (before, it
    built an environment with none of them and the entry point died on `import yaml`). Read as
    MLflow's documented MLproject and python_env.yaml formats say, and a `-r FILE` line as pip's
    requirement-file format does."""
    import yaml

    from conftest import REPO

    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["python_env"] == "python_env.yaml" and "conda_env" not in project and "docker_env" not in project
    env = yaml.safe_load((REPO / project["python_env"]).read_text())

    def pins(lines, base):
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r"):
                yield from pins((base / line[2:].strip()).read_text().splitlines(), base)
            elif line:
                yield line
    got = set(pins(env["dependencies"], REPO))
    expected = {line for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")}
    assert got == expected and "torch==2.14.1" in got
