import math

import numpy as np
import pytest

from pipeline.analysis import stats
from pipeline.analysis.stats import choose_lr, conclusions, critical_batch_size, largest_fit, recommend


def _steps(b_crit=50.0, s_min=100.0, sizes=(8, 16, 32, 64, 128, 256), spread=(0.95, 1.0, 1.05)):
    """Steps to target on S = S_min (1 + B_crit / B), three seeds a few per cent apart."""
    return {b: [s_min * (1 + b_crit / b) * f for f in spread] for b in sizes}


def test_a_known_critical_batch_size_is_recovered_inside_its_interval():
    """Synthetic steps-to-target with a known B_crit, with seed noise: the fit finds it, the
    interval (seeds, learning-rate choice, one size left out) holds it, S_min and E_min follow."""
    rng = np.random.default_rng(7)
    for b_crit in (30.0, 50.0, 120.0):
        by_size = {b: [v * float(rng.lognormal(0, 0.05)) for v in vals] for b, vals in _steps(b_crit).items()}
        crit = critical_batch_size(by_size, {b: [1.0, 1.04] for b in by_size})
        assert crit["status"] == "fitted" and crit["leave_one_out"]
        assert crit["lo"] <= b_crit <= crit["hi"], (b_crit, crit["lo"], crit["hi"])
        assert crit["value"] == pytest.approx(b_crit, rel=0.2) and crit["s_min"] == pytest.approx(100.0, rel=0.1)
        assert crit["e_min"] == pytest.approx(crit["s_min"] * crit["value"])
        assert all(abs(r) < 0.1 for r in crit["residuals"].values())
    # The model-free 20 % figure on exact data: E(B)/E(8) = (1 + B/Bc)/(1 + 8/Bc) = 1.2 at B = 8 + 0.2 (Bc + 8).
    exact = critical_batch_size({b: [v[1]] * 3 for b, v in _steps(50.0).items()})
    assert exact["model_free"] == pytest.approx(8 + 0.2 * 58, rel=0.15)


def test_steps_that_still_halve_leave_the_critical_batch_size_not_determined():
    # S = 8000 / B: perfect scaling everywhere, no S_min to be seen.
    by_size = {b: [8000.0 / b * f for f in (0.98, 1.0, 1.02)] for b in (8, 16, 32, 64)}
    crit = critical_batch_size(by_size)
    assert crit["status"] == "not determined" and "above the largest" in crit["why"]
    assert math.isinf(crit["model_free"])


def test_two_sizes_or_a_poor_fit_are_not_determined_and_say_why():
    crit = critical_batch_size({8: [100.0], 16: [60.0]})
    assert crit["status"] == "not determined" and "needs three" in crit["why"] and crit["value"] is None
    bent = _steps(50.0)
    bent[32] = [v * 2.0 for v in bent[32]]  # one size far off the curve
    crit = critical_batch_size(bent)
    assert crit["status"] == "not determined" and "misses batch size" in crit["why"]


def _row(bs, t, t_ci=0.01, memory=None, throughput=1000.0):
    return {"batch_size": bs, "time_to_target_s": t, "time_to_target_s_ci": t_ci, "throughput": throughput,
            "step_memory_bytes": memory or 1000 * bs, "lr": 0.01}


def test_the_recommendation_is_the_quickest_to_target_and_names_its_ties():
    rows = [_row(8, 3.0), _row(32, 1.0, 0.3), _row(128, 1.2, 0.3), _row(512, None)]
    rec = recommend(rows)
    assert rec["batch_size"] == 32 and rec["ties"] == [128] and rec["basis"] == "time_to_target_s"
    assert recommend([_row(8, None)])["batch_size"] is None  # not determined, with the reason
    assert "no batch size reached" in recommend([_row(8, None)])["why"]


def _outcomes(rng, sizes, seeds, n, p):
    return {b: {s: (rng.random(n) < p[b]).astype(float) for s in seeds} for b in sizes}


def test_test_intervals_cover_seeds_and_examples_and_pair_them():
    rng = np.random.default_rng(0)
    rows = [{"batch_size": b} for b in (8, 64)]
    out = stats.test_intervals(rows, _outcomes(rng, (8, 64), (0, 1, 2), 360, {8: 0.95, 64: 0.93}), "classification")
    assert out[8]["seeds"] == 3 and out[8]["examples"] == 360
    assert out[8]["lo"] < out[8]["value"] < out[8]["hi"] and out[8]["hi"] - out[8]["lo"] > 0.01
    lo, hi = out[8]["diff"][64]
    assert lo < hi


def test_permuting_the_test_labels_changes_no_choice():
    """Validation chooses, test only reports: runs whose test outcomes are scrambled (as a
    permutation of the test labels does) give the same learning rates, recommendation and
    critical batch size; only the test figures move."""
    rng = np.random.default_rng(1)
    runs = []
    for bs, lr, steps in ((8, 0.01, 200.0), (8, 0.03, 150.0), (32, 0.03, 60.0), (32, 0.1, 80.0), (128, 0.1, 30.0)):
        for s in (0, 1):
            runs.append({"batch_size": bs, "lr": lr, "seed": s, "final_val_loss": 0.1,
                         "targets": {"0.2": {"step": steps * (1 + 0.03 * s)}}, "time_to_target_s": steps * 0.001,
                         "test_acc": 0.9})
    rows = [{"batch_size": b, "lr": lr, "time_to_target_s": t, "time_to_target_s_ci": 0.001, "throughput": 1.0,
             "step_memory_bytes": 1} for b, lr, t in ((8, 0.03, 0.15), (32, 0.03, 0.06), (128, 0.1, 0.03))]
    good = _outcomes(rng, (8, 32, 128), (0, 1), 300, {8: 0.95, 32: 0.94, 128: 0.9})
    scrambled = {b: {s: rng.permutation((rng.random(300) < 0.1).astype(float)) for s in v} for b, v in good.items()}
    a = conclusions(rows, runs, "classification", n_train=1000, budget_bytes=2**30, targets=["0.2"],
                    lr_choice=choose_lr(runs, "0.2"), outcomes=good)
    b = conclusions(rows, runs, "classification", n_train=1000, budget_bytes=2**30, targets=["0.2"],
                    lr_choice=choose_lr(runs, "0.2"), outcomes=scrambled)
    assert a["recommended"]["batch_size"] == b["recommended"]["batch_size"] == 128
    assert {k: v["lr"] for k, v in a["lr_choice"].items()} == {k: v["lr"] for k, v in b["lr_choice"].items()}
    assert a["critical"]["value"] == b["critical"]["value"]
    assert a["test"][8]["value"] != b["test"][8]["value"]


def test_the_largest_batch_that_fits_follows_the_measured_memory_line_and_stops_at_the_split():
    rows = [_row(b, 1.0, memory=5000 + 100 * b) for b in (4, 16, 64)]
    fit = largest_fit(rows, budget_bytes=105_000, n_train=10_000)
    assert fit["batch_size"] == 1000 and not fit["whole_split"] and fit["measured_up_to"] == 64
    fit = largest_fit(rows, budget_bytes=10**9, n_train=1257)
    assert fit["batch_size"] == 1257 and fit["whole_split"]


def test_each_batch_size_gets_the_learning_rate_with_fewest_steps_on_validation_never_on_test():
    runs = [{"batch_size": bs, "lr": lr, "seed": s, "final_val_loss": 0.1, "test_acc": test,
             "targets": {} if steps is None else {"0.2": {"step": steps}}}
            for bs, lr, steps, test in ((8, 0.001, 100.0, 0.90), (8, 0.002, 120.0, 0.99),
                                        (64, 0.001, 40.0, 0.90), (64, 0.002, 30.0, 0.91), (64, 0.004, None, 0.1))
            for s in (0, 1)]
    chosen = choose_lr(runs, "0.2")
    assert chosen[8]["lr"] == 0.001 and chosen[64]["lr"] == 0.002
    assert [x["lr"] for x in chosen[64]["by_lr"]] == [0.001, 0.002, 0.004]
    assert math.isnan(chosen[64]["by_lr"][2]["val"])  # a rate that missed is shown, never chosen


def test_interval_is_the_students_t_95_percent_half_width():
    import math
    from pipeline.analysis.stats import interval
    mean, half = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs(half - 4.302653 / math.sqrt(3)) < 1e-5
    assert math.isnan(interval([5.0])[1])


def test_aggregate_gives_mean_and_interval_and_to_target_only_when_every_seed_reached():
    from pipeline.analysis.stats import aggregate
    runs = [{"batch_size": 8, "seed": s, "test_acc": a, "time_to_target_s": t}
            for s, a, t in ((0, 0.90, 1.0), (1, 0.92, 2.0), (2, 0.94, None))]
    (row,) = aggregate(runs)
    assert row["n"] == 3 and row["reached"] == 2 and abs(row["test_acc"] - 0.92) < 1e-12
    assert row["test_acc_ci"] > 0 and "time_to_target_s" not in row


def test_a_difference_is_called_only_when_the_intervals_separate():
    rows = [{"batch_size": 8, "test_acc": 0.95, "test_acc_ci": 0.01, "throughput": 1.0, "time_to_target_s": 1.0},
            {"batch_size": 64, "test_acc": 0.94, "test_acc_ci": 0.01, "throughput": 2.0, "time_to_target_s": 2.0},
            {"batch_size": 512, "test_acc": 0.80, "test_acc_ci": 0.02, "throughput": 3.0, "time_to_target_s": 3.0}]
    best = conclusions(rows, [], "classification", n_train=1000, budget_bytes=2**30, targets=["0.2"])["most_accurate"]
    assert best["batch_size"] == 8 and best["ties"] == [64]


def test_numbers_with_intervals_read_as_people_write_them():
    from pipeline.analysis.claims import human, with_ci
    assert with_ci({"test_acc": 0.96213, "test_acc_ci": 0.0081}, "test_acc") == "0.9621 ± 0.0081"
    # The order of two figures survives their rounding: 0.954 ± 0.104 is not "1.0 ± 0.1".
    assert with_ci({"v": 0.954, "v_ci": 0.104}, "v") == "0.954 ± 0.104"
    assert with_ci({"throughput": 129837.2, "throughput_ci": 2110.0}, "throughput") == "129,837 ± 2,110"
    assert human(129837.2) == "129,837" and human(38404, "step_memory_bytes") == "38.4 kB"


def _claim_rows(memory):
    return [{"batch_size": b, "throughput": tp, "throughput_ci": 10.0, "step_memory_bytes": m,
             "bytes_per_sample": 600.0, "loss_noise": ln, "loss_noise_ci": 0.01, "test_acc": 0.9,
             "test_acc_ci": ci, "time_to_target_s": tt, "time_to_target_s_ci": 0.1, "samples_to_target": 100}
            for b, tp, m, ln, ci, tt in zip((1, 8, 64), (1000.0, 8000.0, 40000.0), memory, (0.9, 0.5, 0.2),
                                            (0.05, 0.02, 0.01), (9.0, 2.0, 1.0))]


def test_claims_get_verdicts_from_the_numbers(ctx_factory):
    from pipeline.analysis.claims import claims
    ctx = ctx_factory()
    out = claims(ctx, _claim_rows((600, 4800, 38400)), "classification")
    assert [c["verdict"] for c in out] == ["holds", "holds", "holds (computed)", "not determined (no rates tried)",
                                           "measured against the control sweep"]
    assert all("holds where" in c["rule"] for c in out)  # each verdict comes with its rule
    flat = [c["verdict"] for c in claims(ctx, _claim_rows((900, 800, 700)), "classification")]
    assert flat[2] == "does not hold here (computed)"
    # A larger batch size that misses a target a smaller one reached: not faster to a result,
    # however many samples per second it runs.
    rows = _claim_rows((600, 4800, 38400))
    rows[-1].update({"time_to_target_s": None, "reached": 0, "n": 3})
    verdicts = [c["verdict"] for c in claims(ctx, rows, "classification")]
    assert verdicts[:2] == ["holds", "does not hold here"]
    # Overlapping intervals at the ends: no verdict either way.
    rows = _claim_rows((600, 4800, 38400))
    for r in rows:
        r["time_to_target_s_ci"] = 10.0
    assert claims(ctx, rows, "classification")[1]["verdict"] == "inconclusive"


def test_one_seed_claims_no_difference_between_batch_sizes(ctx_factory):
    """One seed gives no interval: however far apart two figures are, no claim says they differ."""
    import math
    from pipeline.analysis.claims import claims
    from pipeline.analysis.stats import separated
    rows = _claim_rows((600, 4800, 38400))
    for r in rows:
        for key in [k for k in r if k.endswith("_ci")]:
            r[key] = math.nan
    assert not separated(rows[0], rows[2], "test_acc") and not separated(rows[0], rows[2], "time_to_target_s")
    verdicts = [c["verdict"] for c in claims(ctx_factory({"train": {"seeds": [0]}}), rows, "classification")]
    assert verdicts[:2] == ["inconclusive", "inconclusive"]


def test_the_shuffle_off_control_is_named_as_such(ctx_factory):
    from pipeline.analysis.claims import claims
    ctx = ctx_factory({"train": {"shuffle": False}})
    (shuffle,) = [c for c in claims(ctx, _claim_rows((600, 4800, 38400)), "classification") if "Shuffling" in c["claim"]]
    assert shuffle["verdict"] == "this is the control" and "stored order" in shuffle["numbers"]


def _search(bs, rates):
    return {"chosen": rates[0][0], "at_edge": False, "trials": [
        {"lr": lr, "lr_effective": lr, "diverged": bad, "steps_to": {"headline": None if bad else 10.0}}
        for lr, bad in rates]}


def test_too_small_is_unstable_is_decided_by_divergence_which_can_fail(ctx_factory):
    from pipeline.analysis.claims import claims
    rows = _claim_rows((600, 4800, 38400))
    verdict = lambda searches: claims(ctx_factory(), rows, "classification", {"searches": searches})[3]["verdict"]
    # The smallest size diverges at 0.1, which a larger one trains at: holds.
    assert verdict({1: _search(1, [(0.01, False), (0.1, True)]), 64: _search(64, [(0.1, False)])}) == "holds"
    # The larger one diverges where the smaller trains: does not hold.
    assert verdict({1: _search(1, [(0.1, False)]), 64: _search(64, [(0.1, True)])}) == "does not hold here"
    assert verdict({1: _search(1, [(0.1, False)]), 64: _search(64, [(0.1, False)])}).startswith("not determined")


def test_a_sweep_of_one_batch_size_measures_no_claim_and_separates_it_from_nothing(ctx_factory):
    """`dvc exp run -S 'train.batch_sizes=[256]'` makes a sweep of one size: every claim compares
    sizes, so none gets a verdict from it, and the conclusions do not say it beats other sizes."""
    from pipeline.analysis.claims import claims
    from pipeline.analysis.report import _bullets
    ctx = ctx_factory()
    rows = _claim_rows((600, 4800, 38400))[-1:]
    out = claims(ctx, rows, "classification")
    assert [c["verdict"] for c in out[:4]] == ["not measured (one batch size)"] * 4
    assert all("one batch size (64)" in c["numbers"] for c in out[:4])
    concl = conclusions(rows, [], "classification", n_train=1000, budget_bytes=2**30, targets=["0.8"])
    bullets = " ".join(_bullets(ctx, concl, rows))
    assert "separates" not in bullets and "no choice is made on them" in bullets
    assert concl["critical"]["status"] == "not determined"


def test_each_batch_size_of_a_sweep_gets_the_ui_colour_of_its_group_and_colours_stay_distinct():
    from pipeline.mlflow_ui import UI_PALETTE, batch_size_colour, sweep_colours

    # The groups of the default sweep, as MLflow 3.17's UI draws them (test_ui reads them in Chromium).
    assert [batch_size_colour(bs) for bs in (4, 16, 64, 256)] == ["#0e538b", "#8ddda8", "#8396a5", "#f792a6"]
    assert sweep_colours([256, 4, 64, 16]) == {bs: batch_size_colour(bs) for bs in (4, 16, 64, 256)}
    # 512 and 1024 share a colour in the UI; in the report the larger gets one no batch size of the sweep has.
    assert batch_size_colour(512) == batch_size_colour(1024)
    colours = sweep_colours([64, 512, 1024])
    assert colours[512] == batch_size_colour(512) and len(set(colours.values())) == 3
    assert colours[1024] in UI_PALETTE and colours[1024] not in (batch_size_colour(64), batch_size_colour(512))


def test_plotted_intervals_stop_where_the_figure_can_no_longer_be():
    from pipeline.analysis.plots import bounded_yerr
    # 3 seeds: the t-interval of 0.3 +- 0.4 s would reach -0.1 s; an accuracy of 0.96 +- 0.05 would pass 1.
    pts = [{"batch_size": 4, "t": 0.3, "t_ci": 0.4}, {"batch_size": 16, "t": 0.15, "t_ci": 0.1},
           {"batch_size": 64, "t": 2.0, "t_ci": float("nan")}]
    below, above = bounded_yerr(pts, "t")
    assert below == [0.3, 0.1, 0.0] and above == [0.4, 0.1, 0.0]
    below, above = bounded_yerr([{"acc": 0.96, "acc_ci": 0.05}], "acc", hi=1.0)
    assert below == [0.05] and round(above[0], 12) == 0.04
