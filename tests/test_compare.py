from pipeline.analysis.stats import conclusions, scaling_knee


def _rows(steps):
    return [{"batch_size": b, "steps_to_target": s, "time_to_target_s": None if s is None else s * 0.01,
             "test_acc": 0.9, "throughput": 100.0 * b, "noise_scale": 50.0} for b, s in steps]


def test_perfect_scaling_has_no_knee():
    rows = _rows([(8, 800), (16, 400), (32, 200), (64, 100)])
    knee = scaling_knee(rows, margin=0.5)
    assert knee["anchor"] == 8 and knee["knee"] is None
    assert knee["ideal"] == {8: 800, 16: 400, 32: 200, 64: 100}


def test_knee_is_the_first_size_beyond_the_margin():
    # 32 needs 280 steps against an ideal 200 (x1.4, within 1.5); 64 needs 250 against 100.
    rows = _rows([(8, 800), (16, 420), (32, 280), (64, 250)])
    assert scaling_knee(rows, margin=0.5)["knee"] == 64
    assert scaling_knee(rows, margin=0.3)["knee"] == 32


def test_a_size_that_never_reaches_the_target_is_past_the_knee():
    rows = _rows([(8, 800), (16, 400), (32, None)])
    assert scaling_knee(rows, margin=0.5)["knee"] == 32
    assert scaling_knee(_rows([(8, None), (16, None)]), 0.5)["knee"] is None


def test_conclusions_name_the_winners():
    rows = _rows([(8, 800), (16, 400), (32, 300)])
    rows[1]["test_acc"] = 0.95
    c = conclusions(rows, "classification", 0.5)
    assert c["most_accurate"]["batch_size"] == 16 and c["most_accurate"]["test_acc"] == 0.95
    assert c["fastest_to_target"]["batch_size"] == 32
    assert c["highest_throughput"]["batch_size"] == 32
    assert c["critical_batch_size_noise"] == 50.0


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
    best = conclusions(rows, "classification", 0.5)["most_accurate"]
    assert best["batch_size"] == 8 and best["ties"] == [64]


def test_numbers_with_intervals_read_as_people_write_them():
    from pipeline.analysis.report import human, with_ci
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
    from pipeline.analysis.report import claims
    ctx = ctx_factory()
    verdicts = [c["verdict"] for c in claims(ctx, _claim_rows((600, 4800, 38400)), "classification")]
    assert verdicts[:3] == ["holds", "holds", "holds"] and verdicts[3].startswith("inconclusive")
    flat = [c["verdict"] for c in claims(ctx, _claim_rows((900, 800, 700)), "classification")]
    assert flat[1] == "does not hold here"


def test_a_batch_size_that_missed_the_target_says_so_in_the_stability_claim(ctx_factory):
    from pipeline.analysis.report import claims
    rows = _claim_rows((600, 4800, 38400))
    rows[-1].update({"time_to_target_s": None, "samples_to_target": None, "reached": 1, "n": 3})
    numbers = claims(ctx_factory(), rows, "classification")[2]["numbers"]
    assert "seconds to target 9 vs target reached in 1/3 seeds" in numbers and "vs —" not in numbers


def test_a_sweep_of_one_batch_size_measures_no_claim_and_separates_it_from_nothing(ctx_factory):
    """`dvc exp run -S 'train.batch_sizes=[256]'` makes a sweep of one size: every claim compares
    sizes, so none gets a verdict from it, and the conclusions do not say it beats other sizes."""
    from pipeline.analysis.report import _bullets, claims
    ctx = ctx_factory()
    rows = _claim_rows((600, 4800, 38400))[-1:]
    out = claims(ctx, rows, "classification")
    assert [c["verdict"] for c in out[:3]] == ["not measured (one batch size)"] * 3
    assert all("one batch size (64)" in c["numbers"] for c in out[:3])
    bullets = " ".join(_bullets(ctx, conclusions(rows, "classification", 0.5), n_sizes=1))
    assert "the only batch size in this sweep" in bullets and "separates" not in bullets
    two = _claim_rows((600, 4800, 38400))[-2:]
    assert "separates it from every other" in " ".join(_bullets(ctx, conclusions(two, "classification", 0.5), 2))


def test_each_batch_size_of_a_sweep_gets_the_ui_colour_of_its_group_and_colours_stay_distinct():
    from pipeline.tracking.ui import UI_PALETTE, batch_size_colour, sweep_colours

    # The groups of the default sweep, as MLflow 3.17's UI draws them (test_ui reads them in Chromium).
    assert [batch_size_colour(bs) for bs in (4, 16, 64, 256)] == ["#0e538b", "#8ddda8", "#8396a5", "#f792a6"]
    assert sweep_colours([256, 4, 64, 16]) == {bs: batch_size_colour(bs) for bs in (4, 16, 64, 256)}
    # 512 and 1024 share a colour in the UI; in the report the larger gets one no batch size of the sweep has.
    assert batch_size_colour(512) == batch_size_colour(1024)
    colours = sweep_colours([64, 512, 1024])
    assert colours[512] == batch_size_colour(512) and len(set(colours.values())) == 3
    assert colours[1024] in UI_PALETTE and colours[1024] not in (batch_size_colour(64), batch_size_colour(512))


def test_plotted_intervals_stop_where_the_figure_can_no_longer_be():
    from pipeline.analysis.report import bounded_yerr
    # 3 seeds: the t-interval of 0.3 +- 0.4 s would reach -0.1 s; an accuracy of 0.96 +- 0.05 would pass 1.
    pts = [{"batch_size": 4, "t": 0.3, "t_ci": 0.4}, {"batch_size": 16, "t": 0.15, "t_ci": 0.1},
           {"batch_size": 64, "t": 2.0, "t_ci": float("nan")}]
    below, above = bounded_yerr(pts, "t")
    assert below == [0.3, 0.1, 0.0] and above == [0.4, 0.1, 0.0]
    below, above = bounded_yerr([{"acc": 0.96, "acc_ci": 0.05}], "acc", hi=1.0)
    assert below == [0.05] and round(above[0], 12) == 0.04


def test_noise_scale_plot_leaves_a_gap_where_the_estimate_is_not_measurable(ctx_factory, monkeypatch):
    import math

    from pipeline.analysis import report
    ctx = ctx_factory()
    folder = ctx.train_dir(4, 0)
    folder.mkdir(parents=True)
    (folder / "noise.csv").write_text("samples,b_simple\n4,12.5\n44,-17.4\n84,0.0\n124,30.0\n")
    drawn = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: drawn.update(lines=fig.axes[0].lines))
    report.plot_noise_scale(ctx, [{"batch_size": 4, "seeds": [0]}], [], "classification")
    (line,) = drawn["lines"]
    y = list(line.get_ydata())
    # On the log axis a value <= 0 would plunge to the bottom; it is a gap (nan) instead.
    assert y[0] == 12.5 and y[3] == 30.0 and math.isnan(y[1]) and math.isnan(y[2])
