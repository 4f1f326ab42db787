"""dvc.yaml's deps are what each stage really runs: derived here from the imports."""
import ast

import pytest
import yaml

from conftest import REPO

PKG = REPO / "pipeline"
STAGES = ("prepare", "train", "evaluate", "compare")


def _imports(tree: ast.AST) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            parts = node.module.split(".")
            out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
    return {m for m in out if (PKG / f"{m}.py").is_file()}


def _cli_imports(verb: str) -> set[str]:
    """What `python -m pipeline VERB` imports: __main__ less the other verbs' functions."""
    tree = ast.parse((PKG / "__main__.py").read_text())
    others = {f"_{v.replace('-', '_')}" for v in ("prepare", "train", "evaluate", "compare",
                                                 "find-batch-size", "reproduce", "bench")} - {f"_{verb}"}
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in others)]
    return _imports(tree)


def modules_run_by(verb: str) -> set[str]:
    seen: set[str] = set()
    todo = ["__main__", *_cli_imports(verb), verb]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        if mod != "__main__":
            todo += _imports(ast.parse((PKG / f"{mod}.py").read_text()))
    return seen | {"__init__"}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lists_every_module_it_runs(stage):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    deps = {d for d in dvc["stages"][stage]["deps"] if d.startswith("pipeline/")}
    expected = {f"pipeline/{m}.py" for m in modules_run_by(stage)}
    if stage == "compare":
        expected.add("pipeline/templates/report.html")
    assert deps == expected


def test_train_does_not_depend_on_the_comparison():
    assert "compare" not in modules_run_by("train") and "bench" not in modules_run_by("train")
