"""The gradient noise scale on a case with a known answer.

Linear regression y = w*.x + eps, x ~ N(0, I_d), eps ~ N(0, s^2), loss (w.x - y)^2 at a fixed w.
With delta = w - w*, the per-sample gradient is g = 2 (delta.x - eps) x, so
G = 2 delta and Sigma = 4 (|delta|^2 I + delta delta^T + s^2 I) (Isserlis), hence
B_simple = tr(Sigma)/|G|^2 = ((d + 1)|delta|^2 + d s^2) / |delta|^2.
"""
import torch

from pipeline.core.noise import NoiseScale, squared_norm


def exact_b_simple(delta: torch.Tensor, noise_std: float) -> float:
    d = delta.numel()
    n2 = float(delta.pow(2).sum())
    return ((d + 1) * n2 + d * noise_std ** 2) / n2


def test_estimate_lands_within_a_factor_of_1_3_of_the_exact_value():
    torch.manual_seed(0)
    d, s, batch = 10, 1.0, 64
    w_star = torch.randn(d)
    w = (w_star + 0.3 * torch.randn(d)).requires_grad_(True)
    est = NoiseScale(ema=0.995)
    for _ in range(2000):
        x = torch.randn(batch, d)
        y = x @ w_star + s * torch.randn(batch)
        half = batch // 2
        g_a, = torch.autograd.grad(((x[:half] @ w - y[:half]) ** 2).mean(), [w])
        g_b, = torch.autograd.grad(((x[half:] @ w - y[half:]) ** 2).mean(), [w])
        g = (g_a + g_b) / 2
        small = 0.5 * (squared_norm([g_a]) + squared_norm([g_b]))
        value = est.update(small, squared_norm([g]), half, batch)
    exact = exact_b_simple((w - w_star).detach(), s)
    assert exact / 1.3 < float(value) < exact * 1.3, (float(value), exact)


def test_formulas_recover_inputs_without_noise():
    # Two exact readings: |G|^2 = 4, tr(Sigma) = 8  =>  |G_B|^2 = 4 + 8/B.
    est = NoiseScale(ema=0.5)
    b_small, b_big = 8, 32
    value = est.update(torch.tensor(4 + 8 / b_small), torch.tensor(4 + 8 / b_big), b_small, b_big)
    assert abs(float(est.g2) - 4) < 1e-5 and abs(float(est.trace) - 8) < 1e-4
    assert abs(float(value) - 2) < 1e-5
