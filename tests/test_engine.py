import math

import pytest
import torch

from pipeline.config import TrainParams
from pipeline.core.data import Split
from pipeline.core.batches import Batches
from pipeline.core.checkpoint import Checkpoint
from pipeline.core.engine import Hooks, NullSink, TrainSpec, fit, lr_at, scaled_lr
from pipeline.core.signals import Interrupted, NonFiniteLoss, StopSignals
from pipeline.core.nets import MLP


def toy(n=203, d=5, classes=3, seed=0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return Split(x, y.clamp(max=classes - 1))


# The CUDA cases run where a GPU is (the device check in the README's speed section); elsewhere they
# are reported as skipped.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]


def ids_split(n=103) -> Split:
    # Feature 0 holds the sample's index, so batches can be traced back to samples.
    return Split(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


@pytest.mark.parametrize("drop_last", [False, True])
def test_tensor_batches_cover_each_sample_once_per_epoch(drop_last):
    p = TrainParams(drop_last=drop_last, seed=3)
    b = Batches(ids_split(), p, 10, torch.device("cpu"))
    seen = [xb[:, 0].long() for xb, _ in b.epoch(0)]
    assert all(s.shape[0] == 10 for s in seen[:-1])
    flat = torch.cat(seen)
    if drop_last:
        assert len(seen) == 10 and len(flat) == 100 and len(set(flat.tolist())) == 100
    else:
        assert len(seen) == 11 and seen[-1].shape[0] == 3
        assert sorted(flat.tolist()) == list(range(103))
    for xb, yb in b.epoch(0):
        assert xb.shape == (xb.shape[0], 1) and torch.equal(xb[:, 0].long(), yb)


def test_batch_order_is_seeded_and_differs_between_epochs_and_seeds():
    def order(seed, epoch):
        b = Batches(ids_split(), TrainParams(seed=seed), 10, torch.device("cpu"))
        return torch.cat([xb[:, 0] for xb, _ in b.epoch(epoch)]).tolist()
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_dataloader_path_gives_the_same_batches_as_tensor_path():
    data = ids_split()
    fast = Batches(data, TrainParams(seed=5), 16, torch.device("cpu"))
    slow = Batches(data, TrainParams(seed=5, loader="dataloader"), 16, torch.device("cpu"))
    for epoch in (0, 1):
        for (a, ya), (b, yb) in zip(fast.epoch(epoch), slow.epoch(epoch), strict=True):
            assert torch.equal(a, b) and torch.equal(ya, yb)


def test_resume_mid_epoch_starts_at_the_right_batch():
    b = Batches(ids_split(), TrainParams(), 10, torch.device("cpu"))
    whole = [xb[:, 0].tolist() for xb, _ in b.epoch(2)]
    rest = [xb[:, 0].tolist() for xb, _ in b.epoch(2, start=4)]
    assert rest == whole[4:]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("chunk", [25, 1 << 20])  # 2 batches a chunk (a partial last one), one chunk
def test_chunked_gather_gives_each_rank_its_rows_of_every_global_batch(monkeypatch, chunk, drop_last):
    """Batches gathered a chunk at a time are the epoch permutation cut in order; under two ranks
    each takes every other row of each global batch; a resume inside a chunk starts at its batch."""
    from pipeline.core.batches import epoch_permutation
    from pipeline.core.dist import Dist

    monkeypatch.setattr(Batches, "CHUNK_ELEMENTS", chunk)
    p = TrainParams(seed=7, drop_last=drop_last)
    perm = epoch_permutation(7, 3, 103, torch.device("cpu")).tolist()
    n_batches = 10 if drop_last else 11
    expected = [perm[i * 10:(i + 1) * 10] for i in range(n_batches)]
    one = Batches(ids_split(), p, 10, torch.device("cpu"))
    assert [xb[:, 0].long().tolist() for xb, _ in one.epoch(3)] == expected
    assert [xb[:, 0].long().tolist() for xb, _ in one.epoch(3, start=5)] == expected[5:]
    for rank in (0, 1):
        b = Batches(ids_split(), p, 10, torch.device("cpu"), Dist(rank=rank, world=2))
        got = [xb[:, 0].long().tolist() for xb, _ in b.epoch(3)]
        assert got == [e[rank::2] for e in expected]
        assert [b.samples_in(i, torch.empty(len(g))) for i, g in enumerate(got)] == [len(e) for e in expected]


def test_lr_scaling_and_warmup():
    p = TrainParams(lr=0.1, base_batch_size=32, lr_scaling="linear", warmup_epochs=1)
    assert scaled_lr(p, 128) == pytest.approx(0.4)
    assert scaled_lr(TrainParams(lr=0.1, base_batch_size=32, lr_scaling="sqrt"), 128) == pytest.approx(0.2)
    assert scaled_lr(TrainParams(lr=0.1, lr_scaling="none"), 128) == 0.1
    lrs = [lr_at(p, 128, s, 10) for s in range(12)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4) and lrs[11] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))


def _fit(p, batch_size=16, device="cpu", data=None, sink=None, checkpoint=None, signals=None, **kw):
    torch.manual_seed(p.seed)
    model = MLP(5, (8,), 3)
    spec = TrainSpec(toy() if data is None else data, toy(60, seed=1), p, batch_size, "classification",
                     torch.device(device))
    return fit(model, spec, Hooks(sink or NullSink(), checkpoint, signals), **kw), model


@pytest.mark.parametrize("device", DEVICES)
def test_same_params_and_seed_give_identical_loss_histories(device):
    p = TrainParams(epochs=3, seed=7)
    (a, _), (b, _) = _fit(p, device=device), _fit(p, device=device)
    assert a.history.loss == b.history.loss
    assert [e["val_loss"] for e in a.history.evals] == [e["val_loss"] for e in b.history.evals]
    (c, _) = _fit(TrainParams(epochs=3, seed=8), device=device)
    assert c.history.loss != a.history.loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_cuda_run_takes_the_same_batches_and_losses_as_a_cpu_run():
    p = TrainParams(epochs=2, seed=3)
    (gpu, _), (cpu, _) = _fit(p, device="cuda"), _fit(p, device="cpu")
    assert gpu.history.samples == cpu.history.samples
    assert gpu.history.loss == pytest.approx(cpu.history.loss, rel=1e-4, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_cuda_run_waits_for_the_card_only_when_it_drains_its_figures():
    """No host sync per step: synchronizing calls (item, tolist, pageable copies) are counted by
    torch's sync debug mode; there are few per validation, flush and epoch, none per step."""
    import warnings

    p = TrainParams(epochs=2, seed=1, eval_every_steps=100)
    data = toy(4096)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result, _ = _fit(p, batch_size=8, device="cuda", data=data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    drains = len(result.history.evals) + result.steps // 500 + p.epochs
    print(f"{len(syncs)} host syncs in {result.steps} steps, {drains} drains")
    assert result.steps == 2 * 512
    assert 0 < len(syncs) <= 6 * drains < result.steps / 4


def test_history_has_one_entry_per_optimizer_step():
    r, _ = _fit(TrainParams(epochs=2), batch_size=16)
    assert r.steps == 2 * math.ceil(203 / 16)
    assert r.history.step == list(range(1, r.steps + 1))
    assert r.history.samples[-1] == 2 * 203
    assert len(r.history.loss) == r.steps


class StopAt:
    """A sink that asks for a stop at a given step, as SIGTERM would."""

    def __init__(self, signals, step):
        self.signals, self.step = signals, step

    def ready(self):
        pass

    def resume_from(self, hist, step):
        pass

    def steps(self, chunk):
        if chunk.step[-1] >= self.step and self.signals.requested is None:
            self.signals.requested = 15

    def point(self, *a):
        pass


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("every,eval_every", [(0, 5), (7, 5), (0, 0)])
def test_interrupt_then_resume_gives_the_uninterrupted_result(tmp_path, every, eval_every, device):
    p = TrainParams(epochs=3, checkpoint_every_steps=every, eval_every_steps=eval_every)
    full, model_full = _fit(p, device=device)
    ckpt = Checkpoint(tmp_path / "ck.pt", {"run": "x"})
    signals = StopSignals()
    with pytest.raises(Interrupted):
        _fit(p, sink=StopAt(signals, 20), checkpoint=ckpt, signals=signals, flush_every=1, device=device)
    assert ckpt.path.is_file()
    resumed, model_resumed = _fit(p, checkpoint=ckpt, device=device)
    assert resumed.resumed_from_step == 20
    assert resumed.history.loss == full.history.loss
    # The resumed run validates where the uninterrupted one did: its schedule follows its last validation.
    assert [e["step"] for e in resumed.history.evals] == [e["step"] for e in full.history.evals]
    assert [e["val_loss"] for e in resumed.history.evals] == [e["val_loss"] for e in full.history.evals]
    for a, b in zip(model_full.state_dict().values(), model_resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_of_other_params_is_not_resumed(tmp_path):
    p = TrainParams(epochs=2)
    signals = StopSignals()
    with pytest.raises(Interrupted):
        _fit(p, sink=StopAt(signals, 5), checkpoint=Checkpoint(tmp_path / "ck.pt", {"sweep": "a"}),
             signals=signals, flush_every=1)
    r, _ = _fit(p, checkpoint=Checkpoint(tmp_path / "ck.pt", {"sweep": "b"}))
    assert r.resumed_from_step == 0


def test_unreadable_checkpoint_is_moved_aside_and_said(tmp_path, capsys):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"not a checkpoint")
    r, _ = _fit(TrainParams(epochs=1), checkpoint=Checkpoint(path, {"sweep": "a"}))
    assert r.resumed_from_step == 0
    assert not path.exists() and (tmp_path / "ck.pt.unreadable").read_bytes() == b"not a checkpoint"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read" in err and "ck.pt" in err


def test_non_finite_loss_stops_with_a_clear_message():
    with pytest.raises(NonFiniteLoss, match="optimizer step"):
        _fit(TrainParams(epochs=2, lr=1e30, optimizer="sgd"))


def test_threads_follow_the_work_per_step_and_an_explicit_count_wins():
    from pipeline.core.system import PARALLEL_FLOPS, cpu_count, set_threads, threads_reason

    before = torch.get_num_threads()
    try:
        assert set_threads(0, work=PARALLEL_FLOPS - 1) == 1 == torch.get_num_threads()
        assert set_threads(0, work=PARALLEL_FLOPS) == cpu_count() == torch.get_num_threads()
        assert set_threads(0) == cpu_count()  # work unknown
        assert set_threads(3, work=1) == 3 == torch.get_num_threads()
        # On a GPU the CPU only launches kernels: one thread, whatever the work; explicit still wins.
        assert set_threads(0, work=PARALLEL_FLOPS, device="cuda") == 1 == torch.get_num_threads()
        assert set_threads(2, work=1, device="cuda") == 2
        assert threads_reason(0, PARALLEL_FLOPS - 1).startswith("1: a step's forward pass is ")
        assert threads_reason(3, 1) == "3: train.threads"
    finally:
        torch.set_num_threads(before)


def test_a_convolutional_network_is_judged_by_its_work_not_its_parameters():
    """The CNN and an MLP of about its parameter count: the CNN's step is worth every core at a
    batch where the MLP's is not, because its work is in its activations."""
    from examples.mymodels.nets import MnistCNN
    from pipeline.core.cost import forward_flops
    from pipeline.core.nets import MLP
    from pipeline.core.system import PARALLEL_FLOPS, cpu_count, threads_for

    cnn, mlp = MnistCNN(1, 10), MLP(784, (1500,), 10)
    params = [sum(q.numel() for q in m.parameters()) for m in (cnn, mlp)]
    assert 0.8 < params[0] / params[1] < 1.25
    f_cnn, f_mlp = forward_flops(cnn, torch.randn(2, 1, 28, 28)), forward_flops(mlp, torch.randn(2, 784))
    assert f_mlp == pytest.approx(2 * params[1], rel=0.01)  # a linear layer: two operations a weight
    assert f_cnn > 9 * f_mlp  # its convolutions reuse each weight at every position
    assert f_cnn >= PARALLEL_FLOPS and threads_for(0, f_cnn) == cpu_count()
    # Counting leaves the model as it was: mode, parameters, random state.
    x = torch.randn(2, 1, 28, 28)
    state, rng = {k: v.clone() for k, v in cnn.state_dict().items()}, torch.get_rng_state()
    forward_flops(cnn.train(), x)
    assert cnn.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, cnn.state_dict()[k]) for k, v in state.items())


def test_validations_start_untrained_and_are_spaced_by_what_they_cost():
    """A validation as dear as several steps is spaced so that validations cost at most
    EVAL_SHARE of the steps (by the counted cost); a cheap one comes every 10 % further on."""
    from pipeline.core.cost import EVAL_SHARE, eval_flops, step_flops
    from pipeline.core.cost import eval_chunk
    from pipeline.core.engine import next_eval

    p = TrainParams(max_steps=400)
    big_val = toy(4000, seed=1)
    model = MLP(5, (8,), 3)
    torch.manual_seed(0)
    r = fit(model, TrainSpec(toy(), big_val, p, 2, "classification"))
    steps = [e["step"] for e in r.history.evals]
    assert steps[0] == 0 and steps[-1] == 400
    from pipeline.core.cost import forward_flops
    f = forward_flops(model, big_val.x)
    chunk = eval_chunk(f, "cpu")
    gap = math.ceil(eval_flops(f, 4000, chunk) / step_flops(f, 2) / EVAL_SHARE)
    assert gap > 1
    assert all(b - a >= gap for a, b in zip(steps[:-2], steps[1:-1]))  # the last is the run's end
    assert steps[:-1] == [0] + [next_eval(p, s, gap) for s in steps[:-2]]
    # Counted cost of the validations made, against the steps': within the share (the untrained
    # model's validation and the last one aside).
    assert (len(steps) - 2) * eval_flops(f, 4000, chunk) <= EVAL_SHARE * 400 * step_flops(f, 2)
    # A validation much cheaper than a step (8 rows against a batch of 64 of a wide network): 10 %
    # further on, one step apart at first.
    cheap = fit(MLP(5, (2048, 2048), 3), TrainSpec(toy(), toy(8, seed=1), TrainParams(max_steps=6), 64,
                                                    "classification"))
    assert [e["step"] for e in cheap.history.evals] == [0, 1, 2, 3, 4, 5, 6]


def test_correct_predictions_counted_at_the_drain_match_each_steps_own_count():
    from pipeline.core.pending import Pending

    g = torch.Generator().manual_seed(0)
    pending, direct = Pending(), []
    for i, n in enumerate([16, 16, 5, 16, 1]):  # ragged, as an epoch's last batch is
        out, y = torch.randn(n, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
        direct.append(int((out.argmax(1) == y).sum()))
        pending.add(step=i + 1, samples=0, batch=n, loss=out.sum(), lr=0.1, time=0.0, seconds=0.0, correct=(out, y))
    assert pending.held == 54 * 4
    assert pending.drain(1).correct == direct
    assert len(pending) == 0 and pending.held == 0


def test_a_run_that_diverges_between_validations_names_its_step():
    """Validation finds the model no longer finite and drains the steps, which name where the loss
    first stopped being finite."""
    with pytest.raises(NonFiniteLoss, match=r"loss became (nan|inf) at optimizer step \d+"):
        _fit(TrainParams(max_steps=300, lr=1e30, optimizer="sgd"), flush_every=10**6)


def test_a_dear_validation_comes_early_where_the_training_loss_nears_the_target(monkeypatch):
    """Validations spaced far apart for their cost: the training loss, read every 1/PROBES of the
    spacing, brings the next one forward near the target, so the run stops sooner on the same
    training, and triggered validations stay a quarter spacing apart."""
    import pipeline.core.engine as engine
    from pipeline.core.cost import eval_chunk, eval_flops, EVAL_SHARE, forward_flops, step_flops

    p = TrainParams(max_steps=3000, target_value=0.4, curve_targets=[], lr=0.01)
    val = toy(100_000, seed=1)

    def run():
        torch.manual_seed(0)
        model = MLP(5, (8,), 3)
        return fit(model, TrainSpec(toy(), val, p, 2, "classification")), model

    probed, model = run()
    f = forward_flops(model, val.x)
    gap = math.ceil(eval_flops(f, len(val), eval_chunk(f, "cpu")) / step_flops(f, 2) / EVAL_SHARE)
    steps = [e["step"] for e in probed.history.evals]
    assert gap >= engine.PROBES
    assert any(b - a < gap for a, b in zip(steps[1:-1], steps[2:]))  # brought forward
    assert all(b - a >= gap // 4 for a, b in zip(steps[:-1], steps[1:]))
    monkeypatch.setattr(engine, "PROBES", 10**9)
    plain, _ = run()
    assert probed.target is not None and plain.target is not None
    assert probed.steps < plain.steps
    assert probed.history.loss == plain.history.loss[:probed.steps]  # the same training, validated sooner
