"""The kernel's vectorised exp (fd_exp_sub) against float64, edge cases included."""
import numpy as np

from flashdecode import _kernels


def test_exp_sub_matches_float64_on_the_softmax_range():
    x = -np.linspace(0.0, 87.0, 200_001).astype(np.float32)
    y = x.copy()
    total = _kernels.exp_sub(y, 0.0)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - exact) / exact) < 1e-6
    assert abs(total - exact.sum()) < 1e-4 * exact.sum()     # 200k float32 additions


def test_exp_sub_shift_and_edges():
    x = np.array([3.0, 2.0, -np.inf, np.nan, -100.0, -1e30, 3.0 - 87.5], np.float32)
    y = x.copy()
    _kernels.exp_sub(y, 3.0)
    assert y[0] == 1.0 and abs(y[1] - np.exp(-1.0)) < 1e-7
    assert y[2] == 0.0 and np.isnan(y[3]) and y[4] == 0.0 and y[5] == 0.0 and y[6] == 0.0


def test_exp_sub_tail_lengths():
    for n in range(0, 40):
        x = -np.arange(n, dtype=np.float32) / 7
        y = x.copy()
        total = _kernels.exp_sub(y, 0.0)
        assert np.allclose(y, np.exp(x.astype(np.float64)), rtol=1e-6, atol=0)
        assert abs(total - y.sum(dtype=np.float64)) <= 1e-5 * max(1.0, y.sum())
