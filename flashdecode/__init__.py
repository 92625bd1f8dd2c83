"""flashdecode: decode-phase flash attention for continuous batching.

Every module except this one is generated from the notebooks in book/ (see their headers);
this file only gathers the public API.
"""

import os

# OpenMP threads that run out of work should sleep, not spin: on a machine shared with other jobs a spinning
# thread holds the core its teammate needs to finish (measured on the project's 2-core machine with one other
# busy process: a 2-thread call took 4x as long as a 1-thread call when spinning, the same time when passive).
# Waking a sleeping thread costs microseconds; a decode step takes milliseconds. Must be set before libgomp
# loads (with the kernel, below); an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from flashdecode._kernels import has_openmp, max_threads  # noqa: E402
from flashdecode.api import batched_flash_attention, flash_attention_forward, get_num_threads, set_num_threads  # noqa: E402
from flashdecode.batching import BatchedKvView, KvCache, KvSlot, ListKvView  # noqa: E402
from flashdecode.checks import AttentionError  # noqa: E402
from flashdecode.naive import attention_reference  # noqa: E402
from flashdecode.paged import PagedKvCache  # noqa: E402
from flashdecode.tiling import merge_states  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "AttentionError",
    "BatchedKvView",
    "KvCache",
    "KvSlot",
    "ListKvView",
    "PagedKvCache",
    "attention_reference",
    "batched_flash_attention",
    "flash_attention_forward",
    "get_num_threads",
    "has_openmp",
    "max_threads",
    "merge_states",
    "set_num_threads",
]
