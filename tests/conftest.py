import importlib
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

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


# The browser tests (test_browser.py, test_site.py) drive Debian's Chromium through the PyPI playwright package;
# Playwright's own browser build is not used (it cannot be downloaded here).
CHROMIUM = os.environ.get("FLASHDECODE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason):
    """Skip, with the reason — except in CI (CI=true), where .ci/run installs everything, so it fails."""
    if IN_CI:
        pytest.fail(f"CI must run this test, but {reason}")
    pytest.skip(reason, allow_module_level=True)


def require_module(name):
    """The module `name`, or skip_or_fail (torch and transformers are the hf extra, which make test installs)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        skip_or_fail(f"{name} is not installed (make test installs it)")


def require_browser():
    """Skip, with the reason, when Chromium or playwright is missing — except in CI (CI=true), where it fails:
    .ci/run installs Chromium, so a skip there would hide a broken setup."""
    reason = None
    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} not found (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[dev]')"
    if reason:
        skip_or_fail(f"browser test: {reason}")


# the 2-layer Llama shape the transformers tests build with random weights (no download)
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def property_settings(examples):
    """hypothesis settings for the property tests: reproducible (derandomized), no deadline, no database."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
