"""Each tile-kernel set's exp (plain expf, and the SIMD set's vectorised fd_exp_sub) against float64,
edge cases included."""

import numpy as np
import pytest
from conftest import TILE_KERNELS

from flashdecode import _kernels

pytestmark = pytest.mark.parametrize("kernels", TILE_KERNELS)


def test_exp_sub_matches_float64_on_the_softmax_range(kernels):
    x = -np.linspace(0.0, 87.0, 200_001).astype(np.float32)
    y = x.copy()
    total = _kernels.exp_sub(y, 0.0, kernels)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - exact) / exact) < 1e-6
    assert abs(total - exact.sum()) < 1e-4 * exact.sum()  # 200k float32 additions


def test_exp_sub_shift_and_edges(kernels):
    x = np.array([3.0, 2.0, -np.inf, np.nan, -100.0, -1e30, 3.0 - 87.5], np.float32)
    y = x.copy()
    _kernels.exp_sub(y, 3.0, kernels)
    assert y[0] == 1.0 and abs(y[1] - np.exp(-1.0)) < 1e-7
    # below exp(-87) float32 has only subnormals: the SIMD exp flushes them to 0, libm's expf may not
    assert y[2] == 0.0 and np.isnan(y[3]) and y[5] == 0.0 and 0.0 <= y[4] < 1e-37 and 0.0 <= y[6] < 1e-37


def test_exp_sub_tail_lengths(kernels):
    for n in range(0, 40):
        x = -np.arange(n, dtype=np.float32) / 7
        y = x.copy()
        total = _kernels.exp_sub(y, 0.0, kernels)
        assert np.allclose(y, np.exp(x.astype(np.float64)), rtol=1e-6, atol=0)
        assert abs(total - y.sum(dtype=np.float64)) <= 1e-5 * max(1.0, y.sum())
