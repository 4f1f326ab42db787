"""The gradient noise scale against exact values: a linear model with a closed form, and a small
MLP on the digits whose exact B_simple comes from per-example gradients (torch.func) over the
whole split, at the parameters where training reaches the report's targets."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.core.noise import estimate, measure


def exact_b_simple(model: nn.Module, criterion, x, y) -> float:
    """tr(Sigma) / |G|^2 from every example's own gradient (population covariance)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return criterion(functional_call(model, p, (xi[None],)), yi[None])
    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in per.values()], 1).double()
    mean = flat.mean(0)
    return float(((flat - mean) ** 2).sum(1).mean() / (mean @ mean))


def test_formulas_recover_inputs_without_noise():
    # |G|^2 = 4, tr(Sigma) = 8 on a split of n: E|g_b|^2 = 4 + 8/b (n - b)/(n - 1).
    n, small, big = 1000, 8, 512
    s = 4 + 8 / small * (n - small) / (n - 1)
    b = 4 + 8 / big * (n - big) / (n - 1)
    out = estimate(s, b, small, big, n)
    assert out["g2"] == pytest.approx(4) and out["trace"] == pytest.approx(8 * n / (n - 1) * (n - 1) / n)
    assert out["b_simple"] == pytest.approx(2.0)


def test_non_positive_signal_is_not_a_value():
    assert "b_simple" not in estimate(1.0, 1.0, 8, 512, 10_000)  # |G|^2 estimate 1, trace 0
    assert "b_simple" not in estimate(1.0, 1.2, 8, 512, 10_000)  # |G|^2 above the small batch's: trace < 0


def test_linear_regression_closed_form():
    # y = w*.x + eps, x ~ N(0, I_d), loss (w.x - y)^2: B_simple = ((d + 1)|delta|^2 + d s^2) / |delta|^2.
    torch.manual_seed(0)
    d, s, n = 10, 1.0, 40_000
    w_star = torch.randn(d)
    x = torch.randn(n, d)
    y = x @ w_star + s * torch.randn(n)
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + 0.3 * torch.randn(d))[None])
    delta = (model.weight.detach()[0] - w_star)
    exact = ((d + 1) * delta.pow(2).sum() + d * s ** 2) / delta.pow(2).sum()
    got = measure(model, lambda out, t: ((out[:, 0] - t) ** 2).mean(), x, y, seed=0)["b_simple"]
    assert float(exact) / 1.5 < got < float(exact) * 1.5, (got, float(exact))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x[:1200], torch.tensor(data.target)[:1200]


@pytest.mark.parametrize("steps", [0, 20, 200])
def test_agrees_with_per_example_gradients(digits, steps):
    """Within a factor of 1.5 of the exact value at fixed parameters: at the start, and after as many
    Adam steps (batch size 64) as the default sweep's runs take to reach its targets and beyond."""
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        criterion(model(x[idx]), y[idx]).backward()
        opt.step()
    before = [q.detach().clone() for q in model.parameters()]
    exact = exact_b_simple(model, criterion, x, y)
    got = measure(model, criterion, x, y, seed=3)
    assert exact / 1.5 < got["b_simple"] < exact * 1.5, (got, exact)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))  # left as found
