from pipeline.compare import conclusions, scaling_knee


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
    assert c["most_accurate"] == {"batch_size": 16, "test_acc": 0.95}
    assert c["fastest_to_target"]["batch_size"] == 32
    assert c["highest_throughput"]["batch_size"] == 32
    assert c["critical_batch_size_noise"] == 50.0
