import math

import pytest

from pipeline.analysis.stats import choose_lr, conclusions, critical_batch_size, largest_fit, recommend


def _runs(b_crit=50.0, s_min=100.0, sizes=(8, 16, 32, 64, 128, 256), spread=(0.95, 1.0, 1.05)):
    """Steps to target on S = S_min (1 + B_crit / B), three seeds a few per cent apart."""
    return [{"batch_size": b, "seed": i, "steps_to_target": s_min * (1 + b_crit / b) * f}
            for b in sizes for i, f in enumerate(spread)]


def test_the_fit_recovers_a_known_critical_batch_size_with_an_interval_around_it():
    crit = critical_batch_size(_runs(b_crit=50.0))
    assert crit["status"] == "fitted" and abs(crit["value"] - 50.0) < 1.0 and abs(crit["s_min"] - 100.0) < 2.0
    assert crit["lo"] <= 50.0 <= crit["hi"] and crit["hi"] - crit["lo"] < 20
    assert critical_batch_size(_runs(b_crit=200.0))["value"] == pytest.approx(200.0, rel=0.05)


def test_steps_that_still_halve_put_the_critical_batch_size_above_the_sweep():
    # S = 8000 / B: perfect scaling everywhere, no S_min to be seen.
    runs = [{"batch_size": b, "seed": s, "steps_to_target": 8000.0 / b * f}
            for b in (8, 16, 32, 64) for s, f in enumerate((0.98, 1.0, 1.02))]
    assert critical_batch_size(runs)["status"] == "above"


def test_a_size_that_missed_the_target_in_a_seed_is_left_out_and_two_sizes_do_not_fit():
    runs = _runs(sizes=(8, 16, 32))
    runs[-1]["steps_to_target"] = None
    crit = critical_batch_size(runs)
    assert crit["sizes"] == [8, 16] and crit["status"] == "too few" and crit["value"] is None


def _row(bs, acc, acc_ci, t, t_ci=0.01, memory=None, throughput=1000.0):
    return {"batch_size": bs, "test_acc": acc, "test_acc_ci": acc_ci, "time_to_target_s": t,
            "time_to_target_s_ci": t_ci, "throughput": throughput, "step_memory_bytes": memory or 1000 * bs}


def test_the_recommendation_is_the_quickest_to_target_among_those_not_worse_on_test():
    rows = [_row(8, 0.96, 0.01, 3.0), _row(32, 0.955, 0.01, 1.0), _row(128, 0.90, 0.01, 0.5)]
    rec = recommend(rows, "classification")
    # 128 is quickest but its accuracy interval is below the best's: 32 is the answer.
    assert rec["batch_size"] == 32 and rec["not_worse"] == [8, 32] and rec["basis"] == "time_to_target_s"
    rows[2]["test_acc"] = 0.95
    assert recommend(rows, "classification")["batch_size"] == 128


def test_without_a_size_that_reached_the_target_the_recommendation_is_the_fastest_per_sample():
    rows = [_row(8, 0.96, 0.01, None, throughput=10.0), _row(32, 0.955, 0.01, None, throughput=40.0)]
    assert recommend(rows, "classification") | {"row": None} == {
        "batch_size": 32, "basis": "throughput", "row": None, "score": "test_acc", "not_worse": [8, 32], "ties": []}


def test_the_largest_batch_that_fits_follows_the_measured_memory_line_and_stops_at_the_split():
    rows = [_row(b, 0.9, 0.01, 1.0, memory=5000 + 100 * b) for b in (4, 16, 64)]
    fit = largest_fit(rows, budget_bytes=105_000, n_train=10_000)
    assert fit["batch_size"] == 1000 and not fit["whole_split"] and fit["measured_up_to"] == 64
    fit = largest_fit(rows, budget_bytes=10**9, n_train=1257)
    assert fit["batch_size"] == 1257 and fit["whole_split"]


def test_each_batch_size_gets_the_learning_rate_best_on_validation_never_on_test():
    runs = [{"batch_size": bs, "lr": lr, "seed": s, "final_val_acc": val, "test_acc": test}
            for bs, lr, val, test in ((8, 0.001, 0.95, 0.90), (8, 0.002, 0.93, 0.99),
                                      (64, 0.001, 0.90, 0.90), (64, 0.002, 0.94, 0.91), (64, 0.004, math.nan, 0.1))
            for s in (0, 1)]
    chosen = choose_lr(runs, "val_acc")
    assert chosen[8]["lr"] == 0.001 and chosen[64]["lr"] == 0.002
    assert [x["lr"] for x in chosen[64]["by_lr"]] == [0.001, 0.002, 0.004]
    assert math.isnan(chosen[64]["by_lr"][2]["val"])  # a diverged rate is shown, never chosen
    loss_runs = [r | {"final_val_loss": 1 - r["final_val_acc"]} for r in runs]
    assert choose_lr(loss_runs, "val_loss")[64]["lr"] == 0.002


def test_conclusions_name_ties_instead_of_a_winner():
    rows = [_row(8, 0.95, 0.01, 2.0), _row(64, 0.94, 0.01, 1.0), _row(512, 0.80, 0.02, None)]
    c = conclusions(rows, [], "classification", n_train=1000, budget_bytes=2**30)
    assert c["most_accurate"]["batch_size"] == 8 and c["most_accurate"]["ties"] == [64]
    assert c["recommended"]["batch_size"] == 64 and c["missed_target"] == [512]
    assert c["critical"]["status"] == "too few"


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
    best = conclusions(rows, [], "classification", n_train=1000, budget_bytes=2**30)["most_accurate"]
    assert best["batch_size"] == 8 and best["ties"] == [64]


def test_numbers_with_intervals_read_as_people_write_them():
    from pipeline.analysis.claims import human, with_ci
    assert with_ci({"test_acc": 0.96213, "test_acc_ci": 0.0081}, "test_acc") == "0.962 ± 0.008"
    assert with_ci({"throughput": 129837.2, "throughput_ci": 2110.0}, "throughput") == "129,837 ± 2,110"
    assert human(129837.2) == "129,837" and human(38404, "step_memory_bytes") == "38.4 kB"


def _claim_rows(memory):
    return [{"batch_size": b, "throughput": tp, "throughput_ci": 10.0, "step_memory_bytes": m,
             "bytes_per_sample": 600.0, "loss_noise": ln, "loss_noise_ci": 0.01, "test_acc": 0.9,
             "test_acc_ci": ci, "time_to_target_s": tt, "samples_to_target": 100}
            for b, tp, m, ln, ci, tt in zip((1, 8, 64), (1000.0, 8000.0, 40000.0), memory, (0.9, 0.5, 0.2),
                                            (0.05, 0.02, 0.01), (9.0, 2.0, 1.0))]


def test_claims_get_verdicts_from_the_numbers(ctx_factory):
    from pipeline.analysis.claims import claims
    ctx = ctx_factory()
    out = claims(ctx, _claim_rows((600, 4800, 38400)), "classification")
    assert [c["verdict"] for c in out] == ["holds"] * 4 + ["measured against the control sweep"]
    assert all(c["rule"].startswith("holds where") for c in out)  # each verdict comes with its rule
    flat = [c["verdict"] for c in claims(ctx, _claim_rows((900, 800, 700)), "classification")]
    assert flat[2] == "does not hold here"
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


def test_the_shuffle_off_control_is_named_as_such(ctx_factory):
    from pipeline.analysis.claims import claims
    ctx = ctx_factory({"train": {"shuffle": False}})
    (shuffle,) = [c for c in claims(ctx, _claim_rows((600, 4800, 38400)), "classification") if "Shuffling" in c["claim"]]
    assert shuffle["verdict"] == "this is the control" and "stored order" in shuffle["numbers"]


def test_a_batch_size_that_missed_the_target_says_so_in_the_stability_claim(ctx_factory):
    from pipeline.analysis.claims import claims
    rows = _claim_rows((600, 4800, 38400))
    rows[-1].update({"time_to_target_s": None, "samples_to_target": None, "reached": 1, "n": 3})
    numbers = claims(ctx_factory(), rows, "classification")[3]["numbers"]
    assert "seconds to target 9 vs target reached in 1/3 seeds" in numbers and "vs —" not in numbers


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
    concl = conclusions(rows, [], "classification", n_train=1000, budget_bytes=2**30)
    bullets = " ".join(_bullets(ctx, concl, rows))
    assert "the only batch size in this sweep" in bullets and "separates" not in bullets
    two = _claim_rows((600, 4800, 38400))[-2:]
    two[0]["test_acc"] = 0.5
    concl = conclusions(two, [], "classification", n_train=1000, budget_bytes=2**30)
    assert "separates it from every other" in " ".join(_bullets(ctx, concl, two))
    two[0]["test_acc"] = 0.9
    concl = conclusions(two, [], "classification", n_train=1000, budget_bytes=2**30)
    assert "tied between batch sizes <b>8 and 64</b>" in " ".join(_bullets(ctx, concl, two))


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


def test_noise_scale_plot_leaves_a_gap_where_the_estimate_is_not_measurable(ctx_factory, monkeypatch):
    import math

    from pipeline.analysis import plots
    ctx = ctx_factory()
    folder = ctx.train_dir(4, 0)
    folder.mkdir(parents=True)
    (folder / "noise.csv").write_text("samples,b_simple\n4,12.5\n44,-17.4\n84,0.0\n124,30.0\n")
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.update(lines=fig.axes[0].lines))
    plots.plot_noise_scale(ctx, [{"batch_size": 4, "seeds": [0]}], [], "classification")
    (line,) = drawn["lines"]
    y = list(line.get_ydata())
    # On the log axis a value <= 0 would plunge to the bottom; it is a gap (nan) instead.
    assert y[0] == 12.5 and y[3] == 30.0 and math.isnan(y[1]) and math.isnan(y[2])
