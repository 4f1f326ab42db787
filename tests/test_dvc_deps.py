"""dvc.yaml's deps are what shapes each stage's outputs: its data, its params and the code that
computes them, derived here from the imports. The MLflow view (pipeline/tracking, less the UI
colours the report shares), the CLI, the locks and the tools shape no output, so editing them
reruns nothing."""
import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PKG = REPO / "pipeline"
STAGES = ("check", "prepare", "train", "evaluate", "compare")
# Code that publishes, locks, handles processes or parses the command line: it changes no file
# a stage writes.
# Nor does where the trainings run (pipeline/stages/remote.py, the Ray executor: the same files
# either way, as its params section, executor, is no stage's param).
NOT_SHAPING = ("pipeline/tracking/", "pipeline/tools/", "pipeline/__main__.py", "pipeline/launcher.py",
               "pipeline/lock.py", "pipeline/procs.py",
               "pipeline/stages/remote.py")
SHAPING_ANYWAY = ("pipeline/mlflow_ui.py",)  # the report's colours are the MLflow UI's
# The network's file is model.code (a built-in's: nets.py), a dep by interpolation, so that a
# user's _target_ module is one too.
MODEL_CODE = "pipeline/core/nets.py"
DATA_CODE = "pipeline/core/datasets.py"  # the same for the data: data.code


def _resolve(module: Path, node: ast.ImportFrom) -> list[Path]:
    """The files an import names, for imports inside the package."""
    if node.level:
        base = module.parent
        for _ in range(node.level - 1):
            base = base.parent
    elif (node.module or "").startswith("pipeline"):
        base = REPO
    else:
        return []
    parts = (node.module or "").split(".") if node.module else []
    target = base.joinpath(*parts)
    found = []
    if target.with_suffix(".py").is_file():
        found.append(target.with_suffix(".py"))
    elif target.is_dir():
        found.append(target / "__init__.py")
        found += [target / f"{a.name}.py" for a in node.names if (target / f"{a.name}.py").is_file()]
    return found


def _shapes(path: Path) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return rel in SHAPING_ANYWAY or not rel.startswith(NOT_SHAPING)


def modules_of(stage: str) -> set[str]:
    seen: set[Path] = set()
    todo = [PKG / "stages" / f"{stage}.py"]
    while todo:
        path = todo.pop()
        if path in seen or not _shapes(path):
            continue
        seen.add(path)
        for parent in path.relative_to(REPO).parents:  # packages run their __init__ first
            if parent.name and (REPO / parent / "__init__.py").is_file():
                seen.add(REPO / parent / "__init__.py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                todo += _resolve(path, node)
    return {p.relative_to(REPO).as_posix() for p in seen}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_depends_on_the_code_that_shapes_its_outputs(stage):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = {d for d in dvc["stages"][stage]["deps"] if d.startswith("pipeline/")}
    expected = modules_of(stage)
    if stage == "compare":
        expected.add("pipeline/analysis/templates/report.html")
    for code, key in ((MODEL_CODE, "${model.code}"), (DATA_CODE, "${data.code}")):
        if code in expected:
            expected.discard(code)
            assert key in dvc["stages"][stage]["deps"]
    assert deps == expected


def test_model_code_is_a_dep_of_the_stages_that_build_the_network():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["model"]["code"] == MODEL_CODE
    users = {s for s in STAGES if "${model.code}" in dvc["stages"][s]["deps"]}
    assert users == {"check", "train", "evaluate"}
    assert params["data"]["code"] == DATA_CODE
    assert {s for s in STAGES if "${data.code}" in dvc["stages"][s]["deps"]} == {"check", "prepare"}


def test_no_stage_depends_on_publishing_or_tools():
    for stage in STAGES:
        assert not any(m.startswith(("pipeline/tracking/publish", "pipeline/tools/")) for m in modules_of(stage))
    assert "pipeline/stages/compare.py" not in modules_of("train")


def test_no_stage_reruns_for_tracking_or_executor_params():
    """MLflow settings (which experiment, how many points) shape the view, not the outputs; the
    executor (local or Ray) where they are made. Neither is part of a sweep's identity."""
    from pipeline.config import parse_params
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    for stage in STAGES:
        assert not any(p.startswith(("tracking", "executor")) for p in dvc["stages"][stage].get("params", []))
    local, ray = parse_params({}), parse_params({"executor": {"name": "ray", "gpus": 0.25}})
    assert local.sweep_key("d") == ray.sweep_key("d")


def test_the_committed_dvc_lock_matches_the_code_and_params_it_was_made_with():
    """A fresh clone's `make run` finds every stage up to date only if dvc.lock records this
    commit's code and params.yaml: each code dep's md5 and each stage's params as they are now
    (a code change is committed with the dvc.lock of a `make run` at that code)."""
    import hashlib
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stale = []
    for name, stage in lock.items():
        for dep in stage.get("deps", []):
            path = REPO / dep["path"]
            if dep["path"].endswith(".py") and hashlib.md5(path.read_bytes()).hexdigest() != dep.get("md5"):
                stale.append(f"{name}: {dep['path']}")
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            now = params
            for part in key.split("."):
                now = now.get(part) if isinstance(now, dict) else None
            if now != value:
                stale.append(f"{name}: params {key}")
    assert not stale, f"dvc.lock predates HEAD (run `make run`, commit dvc.lock): {stale[:8]}"
    assert {n.split("@")[0] for n in lock} == set(dvc)  # every stage recorded
