import numpy as np
import pytest

from flashdecode import KvSlot, ListKvView

# every backend, so each test covers the plain Cython tile kernels, the SIMD ones, the default and numpy
BACKENDS = ["auto", "simd", "cython", "numpy"]
TILE_KERNELS = ["cython", "simd"]  # the compiled tile-kernel sets (flashdecode._kernels.KERNEL_SETS)


def rel_err(x, ref):
    """max |x - ref| / max |ref|: relative to the output's scale, robust to entries near zero."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if ref.size == 0:
        return 0.0
    finite = np.isfinite(ref)
    assert np.array_equal(finite, np.isfinite(x)), "inf/NaN pattern differs from the reference"
    scale = max(np.abs(ref[finite]).max(initial=0.0), 1e-30)
    return float(np.abs(x[finite] - ref[finite]).max(initial=0.0) / scale)


def random_view(rng, lengths, num_kv_heads, head_dim, spare=0, dtype=np.float32):
    """A ListKvView whose slot b holds lengths[b] valid tokens plus `spare` tokens of capacity."""
    keys = [rng.standard_normal((n + spare, num_kv_heads, head_dim)).astype(dtype) for n in lengths]
    values = [rng.standard_normal((n + spare, num_kv_heads, head_dim)).astype(dtype) for n in lengths]
    slots = [KvSlot(request_id=100 + b, slot_index=b, position=n) for b, n in enumerate(lengths)]
    return ListKvView(slots, keys, values)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
