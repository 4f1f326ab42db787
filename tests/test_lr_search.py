"""The learning-rate search's rule on a known response: where it looks, what it picks."""
import math

from pipeline.stages.lr_search import best, line, search


def _trial(optimum: float, steps_at_best: float = 100.0, diverge_above: float = math.inf):
    """Steps to the headline target grow with the distance (in log rate) from ``optimum``."""
    tried = []

    def run(lr: float) -> dict:
        tried.append(lr)
        if lr > diverge_above:
            return {"lr": lr, "lr_effective": lr, "diverged": True, "final_val_loss": None,
                    "steps_to": {"headline": None, "0.5": None}}
        steps = steps_at_best * (1 + abs(math.log2(lr / optimum)))
        return {"lr": lr, "lr_effective": lr, "diverged": False, "final_val_loss": 0.1,
                "steps_to": {"headline": steps, "0.5": steps / 2}}
    return run, tried


def test_three_rates_around_the_start_suffice_when_the_best_is_inside():
    run, tried = _trial(optimum=0.01)
    found = search(run, 0.01, 2.0, 7)
    assert tried == [0.005, 0.01, 0.02] and found["chosen"] == 0.01
    assert found["from_edge"] == 1 and not found["at_edge"]


def test_the_search_widens_toward_the_better_side_until_the_best_is_inside():
    run, tried = _trial(optimum=0.08)
    found = search(run, 0.01, 2.0, 7)
    assert tried == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16] and found["chosen"] == 0.08 and not found["at_edge"]
    run, tried = _trial(optimum=0.0001)
    found = search(run, 0.01, 2.0, 5)  # the limit reached with the best still at the edge: said so
    assert len(tried) == 5 and found["chosen"] == min(tried) and found["at_edge"]
    assert "at the edge" in line(found | {"batch_size": 8, "seed": 0})


def test_a_diverged_rate_is_never_chosen_and_ties_go_to_the_easier_targets():
    run, _ = _trial(optimum=0.04, diverge_above=0.03)
    found = search(run, 0.01, 2.0, 7)
    assert found["chosen"] == 0.02 and any(t["diverged"] for t in found["trials"])
    a = {"lr": 0.01, "final_val_loss": 0.1, "steps_to": {"headline": 100.0, "0.5": 60.0}}
    b = {"lr": 0.02, "final_val_loss": 0.1, "steps_to": {"headline": 103.0, "0.5": 40.0}}  # within 5 %
    c = {"lr": 0.04, "final_val_loss": 0.1, "steps_to": {"headline": 120.0, "0.5": 10.0}}
    assert best([a, b, c])["lr"] == 0.02


def test_a_search_kept_for_a_stopped_stage_is_reused_and_gone_once_every_seed_trained(ctx_factory, monkeypatch):
    """Kept in checkpoints/ so that a stage run again after a stop does not search again; removed
    once its seeds trained, so that a stage run again for another reason (its code changed) searches."""
    from pipeline.stages import lr_search, prepare

    ctx = ctx_factory({"train": {"lr_search": True, "lr_search_trials": 3, "max_steps": 30, "stop_at_target": True,
                                 "target_metric": "val_loss", "target_value": 0.5}})
    prepare.run(ctx)
    searched = []
    real = lr_search.search
    monkeypatch.setattr(lr_search, "search", lambda *a: searched.append(1) or real(*a))
    first = lr_search.run(ctx, 16)
    assert lr_search.run(ctx, 16) == first and len(searched) == 1  # a stopped stage's rerun: kept
    lr_search.done(ctx, 16)
    assert not (ctx.workdir / "checkpoints" / "bs16-lr-search.json").exists()
    assert lr_search.run(ctx, 16)["chosen"] == first["chosen"] and len(searched) == 2
