"""Thread control: num_threads=, get_num_threads/set_num_threads, OMP_NUM_THREADS and threadpoolctl."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import require_module

import flashdecode as fd
from flashdecode import _kernels

needs_openmp = pytest.mark.skipif(not fd.has_openmp(), reason="built without OpenMP")


def small_problem():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 32)).astype(np.float32)
    k = rng.standard_normal((5000, 1, 32)).astype(np.float32)
    return q, k


def test_set_num_threads_round_trip():
    before = fd.get_num_threads()
    previous = fd.set_num_threads(1)
    try:
        assert previous == before and fd.get_num_threads() == 1
        q, k = small_problem()
        fd.flash_attention_forward(q, k, k)
        assert _kernels.last_team_size() == 1
    finally:
        fd.set_num_threads(before)
    assert fd.get_num_threads() == before


def test_set_num_threads_rejects_bad_values():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(fd.AttentionError):
            fd.set_num_threads(bad)


@needs_openmp
def test_num_threads_argument_is_used():
    q, k = small_problem()
    fd.flash_attention_forward(q, k, k, num_threads=2, split_size=500)
    assert _kernels.last_team_size() == 2
    fd.flash_attention_forward(q, k, k, num_threads=1, split_size=500)
    assert _kernels.last_team_size() == 1


@needs_openmp
def test_threadpoolctl_limit_is_honoured():
    threadpoolctl = require_module("threadpoolctl")
    q, k = small_problem()
    with threadpoolctl.threadpool_limits(1, "openmp"):
        assert fd.get_num_threads() == 1
        out = fd.flash_attention_forward(q, k, k)
        assert _kernels.last_team_size() == 1
    ref = fd.attention_reference(q, k, k)[0]
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()


@needs_openmp
@pytest.mark.parametrize("threads", ["1", "2"])
def test_omp_num_threads_is_honoured(threads):
    code = (
        "import numpy as np, flashdecode as fd\n"
        "from flashdecode import _kernels\n"
        "q = np.ones((1, 4, 32), np.float32); k = np.ones((5000, 1, 32), np.float32)\n"
        "fd.flash_attention_forward(q, k, k, split_size=500)\n"
        "print(fd.get_num_threads(), _kernels.last_team_size())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == [threads, threads]
