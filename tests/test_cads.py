"""CADS math (Sadat et al., ICLR 2024, Eqs. 3-5) against a float64 reference written from the paper."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffattn.errors import ConfigError
from diffattn.methods.cads import cads_condition, cads_gamma, cads_rescale


def _reference(y, n, gamma, s, psi):
    """Eqs. 3 and 5 in float64 numpy, per sample over every other axis."""
    y, n = y.astype(np.float64), n.astype(np.float64)
    noisy = np.sqrt(gamma) * y + s * np.sqrt(1 - gamma) * n
    axes = tuple(range(1, y.ndim))
    mn, sn = noisy.mean(axes, keepdims=True), noisy.std(axes, ddof=1, keepdims=True)
    my, sy = y.mean(axes, keepdims=True), y.std(axes, ddof=1, keepdims=True)
    return psi * ((noisy - mn) / sn * sy + my) + (1 - psi) * noisy


def test_gamma_is_the_papers_piecewise_schedule():
    assert [cads_gamma(t, 0.6, 0.9) for t in (0.0, 0.6, 0.75, 0.9, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0])
    assert cads_gamma(0.5, 0.3, 0.8) == pytest.approx(0.6)
    ts = np.linspace(0, 1, 101)
    gs = [cads_gamma(float(t)) for t in ts]
    assert all(a >= b for a, b in zip(gs, gs[1:]))  # annealed: never rises towards pure noise


@pytest.mark.parametrize("gamma,s,psi", [(0.0, 0.25, 1.0), (0.5, 0.5, 0.0), (0.3, 0.7, 0.6), (0.8, 0.1, 1.0)])
def test_condition_matches_the_float64_reference(gamma, s, psi):
    g = torch.Generator().manual_seed(0)
    y, n = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    got = cads_condition(y, gamma, s, psi, noise=n)
    want = _reference(y.numpy(), n.numpy(), gamma, s, psi)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_exact_at_gamma_one_and_rescale_keeps_each_samples_statistics():
    y = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    assert cads_condition(y, 1.0, 0.7, 0.5) is y
    out = cads_rescale(y * 3 + 2, y, psi=1.0)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-5)  # an affine copy comes back exactly
    noisy = cads_condition(y, 0.0, 1.0, 1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(noisy.mean((1, 2)), y.mean((1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(noisy.std((1, 2)), y.std((1, 2)), rtol=1e-5, atol=1e-5)


def test_bad_settings_are_config_errors():
    y = torch.zeros(1, 2, 3)
    for call in (lambda: cads_gamma(0.5, 0.9, 0.6), lambda: cads_gamma(float("nan")),
                 lambda: cads_condition(y, 1.5), lambda: cads_condition(y, 0.5, -1.0),
                 lambda: cads_condition(y, 0.5, noise=torch.zeros(2)), lambda: cads_rescale(y, y, psi=2.0)):
        with pytest.raises(ConfigError):
            call()
