"""The batch-size protocol end to end on real trainings: each batch size's rate searched on the
validation split, runs that stop at the target within a step budget, and a comparison whose
choices the test split cannot move."""
import json

import pytest
import torch

from pipeline.context import write_json
from pipeline.core.data import sha256_file
from pipeline.stages import compare, evaluate, prepare, train

pytestmark = pytest.mark.slow

PROTOCOL = {"train": {"batch_sizes": [16, 64, 256], "seeds": [0, 1], "epochs": 0, "max_steps": 600,
                      "stop_at_target": True, "lr_search": True, "lr_search_factor": 2.0, "lr_search_trials": 5,
                      "lr": 0.01, "lr_scaling": "sqrt", "target_metric": "val_loss", "target_value": 0.3,
                      "curve_targets": [0.6, 0.45]}}


def _sweep(ctx):
    found = {}
    for bs in ctx.params.train.batch_sizes:
        found[bs] = train.search(ctx, bs)
        train.run(ctx, bs, lr=found[bs]["chosen"])
        evaluate.run(ctx, bs)
    return found, compare.run(ctx)["conclusions"]


def _permute_test_labels(ctx) -> None:
    """The test split's labels shuffled in place; the manifest's checksum follows the file (its
    data hash, the sweep's identity, stays: the trainings are the same)."""
    path = ctx.data_dir / "test.pt"
    tensors = torch.load(path, weights_only=True)
    tensors["y"] = tensors["y"][torch.randperm(len(tensors["y"]), generator=torch.Generator().manual_seed(5))]
    torch.save(tensors, path)
    manifest = json.loads((ctx.data_dir / "manifest.json").read_text())
    manifest["splits"]["test"]["sha256"] = sha256_file(path)
    write_json(ctx.data_dir / "manifest.json", manifest)


def test_search_budget_and_choices_that_the_test_split_cannot_move(ctx_factory):
    ctx = ctx_factory(PROTOCOL)
    prepare.run(ctx)
    found, first = _sweep(ctx)
    for bs, f in found.items():
        # Three rates around the rule's, widened while the best sat at an edge; every trial on seed 0.
        rates = [t["lr"] for t in f["trials"]]
        assert 3 <= len(rates) <= 5 and f["chosen"] in rates and f["seed"] == 0
        assert not f["at_edge"] or len(rates) == 5
        on_disk = json.loads((ctx.train_dir(bs) / "lr_search.json").read_text())
        assert on_disk["chosen"] == f["chosen"]
        for seed in (0, 1):
            summary = json.loads((ctx.train_dir(bs, seed) / "summary.json").read_text())
            assert summary["lr"] == f["chosen"]
            # Stopped at the headline target, within the budget; every easier target crossed before it.
            assert summary["target_reached"] and summary["steps"] <= 600 and not summary["censored"]
            steps = [summary["targets"][k]["step"] for k in ("0.6", "0.45", "0.3")]
            assert steps == sorted(steps) and summary["steps"] >= steps[-1]
            assert summary["time_to_target_s"] == pytest.approx(steps[-1] * summary["step_seconds"])
    assert set(first["critical_by_target"]) == {"0.6", "0.45", "0.3"}

    _permute_test_labels(ctx)
    for bs in ctx.params.train.batch_sizes:
        evaluate.run(ctx, bs)
    second = compare.run(ctx)["conclusions"]
    assert second["recommended"]["batch_size"] == first["recommended"]["batch_size"]
    assert second["recommended"]["row"]["lr"] == first["recommended"]["row"]["lr"]
    assert {k: v["chosen"] for k, v in second["searches"].items()} == {k: v["chosen"] for k, v in found.items()}
    assert second["critical"] | {"lo": 0, "hi": 0} == first["critical"] | {"lo": 0, "hi": 0}
    # Only what is reported moved: the test figures.
    assert all(second["test"][bs]["value"] < first["test"][bs]["value"] - 0.3 for bs in found)


def test_a_run_that_misses_the_target_is_censored_at_its_budget(ctx_factory):
    ctx = ctx_factory({"train": {**PROTOCOL["train"], "batch_sizes": [64], "seeds": [0], "lr_search": False,
                                 "max_steps": 5, "lr_scaling": "none"}})
    prepare.run(ctx)
    (summary,) = train.run(ctx, 64)
    assert summary["steps"] == 5 and summary["censored"] and summary["steps_to_target"] is None
    assert summary["budget_steps"] == 5 and summary["time_to_target_s"] is None
