import pytest
import torch

from pipeline.config import ParamsError, parse_params
from pipeline.tools.find_batch_size import find


@pytest.mark.slow
def test_doubles_then_bisects_to_the_largest_size_within_the_budget():
    p = parse_params({"model": {"hidden_sizes": [64]}})
    budget = 48 * 2**20
    found = find(p, 64, 10, "classification", torch.device("cpu"), 1, 1 << 22, budget, log=lambda m: None,
                 rate=False)
    assert found.largest is not None and found.largest > 1024
    ok = [t for t in found.trials if t.fits]
    bad = [t for t in found.trials if not t.fits]
    assert all(t.peak_bytes <= budget for t in ok)
    assert found.peak_bytes <= budget
    # Doubling first: the successful sizes before the first failure are powers of two.
    first_fail = found.trials.index(bad[0])
    assert [t.batch_size for t in found.trials[:first_fail]] == [2 ** k for k in range(first_fail)]
    # Then bisection: the smallest failure lies within 1/64 above the answer.
    assert min(t.batch_size for t in bad) - found.largest <= max(1, found.largest // 64)


def test_no_size_fits_is_an_answer_not_a_crash():
    p = parse_params({})
    found = find(p, 64, 10, "classification", torch.device("cpu"), 1 << 20, 1 << 22, 1 * 2**20, log=lambda m: None)
    assert found.largest is None and len(found.trials) == 1 and not found.trials[0].fits


def test_cpu_needs_a_budget():
    with pytest.raises(ParamsError, match="memory-budget-mb"):
        find(parse_params({}), 64, 10, "classification", torch.device("cpu"), 1, 8, None)


def test_a_batch_norm_model_is_searched_from_batch_size_2():
    """Batch norm cannot train on one sample: that is said, and the search goes on from 2."""
    import torch
    from pipeline.config import parse_params
    from pipeline.tools.find_batch_size import find
    p = parse_params({"model": {"name": "resnet18"}})
    lines = []
    found = find(p, (3, 8, 8), 4, "classification", torch.device("cpu"), 1, 8, 512 * 2**20, log=lines.append,
                 rate=False)
    assert found.trials[0].batch_size == 1 and "cannot train on one sample" in found.trials[0].note
    assert found.largest == 8 and [t.batch_size for t in found.trials[1:]] == [2, 4, 8]


def test_the_search_stops_at_the_training_split_and_reports_where_throughput_stops_rising():
    """A batch larger than the training split is never needed: the search ends there, whatever the
    memory allows; each size that fits also runs real steps, and the knee is one of those sizes."""
    p = parse_params({})
    lines = []
    found = find(p, 64, 10, "classification", torch.device("cpu"), 1, 1 << 24, 1024 * 2**20, log=lines.append,
                 n_train=100)
    assert found.largest == 100 and found.capped_at == 100
    assert [t.batch_size for t in found.trials] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert all(t.samples_per_s and t.samples_per_s > 0 for t in found.trials)
    assert found.knee() in [t.batch_size for t in found.trials]
    assert all("samples/s" in line for line in lines)
    # Each rate is measured three times; each repeat gives a knee of its own, which can differ.
    assert all(len(t.rates) == 3 and t.samples_per_s == sorted(t.rates)[1] for t in found.trials)
    assert len(found.knees()) == 3 and set(found.knees()) <= {t.batch_size for t in found.trials}


def test_a_knee_that_moves_between_repeats_is_called_uncertain():
    from pipeline.tools.find_batch_size import Found, Trial
    steady = Found(64, 1, [Trial(8, True, 1, rates=[100.0, 101, 99], samples_per_s=100.0),
                           Trial(64, True, 1, rates=[400.0, 410, 395], samples_per_s=400.0)])
    assert set(steady.knees()) == {64}
    swinging = Found(64, 1, [Trial(8, True, 1, rates=[100.0, 390, 99], samples_per_s=100.0),
                             Trial(64, True, 1, rates=[400.0, 400, 395], samples_per_s=400.0)])
    assert swinging.knee() == 64 and sorted(set(swinging.knees())) == [8, 64]
