"""flashdecode: decode-phase flash attention for continuous batching.

Every module except this one is generated from the notebooks in book/ (see their headers);
this file only gathers the public API.
"""
from flashdecode._kernels import has_openmp, max_threads
from flashdecode.api import batched_flash_attention, flash_attention_forward, get_num_threads, set_num_threads
from flashdecode.batching import BatchedKvView, KvCache, KvSlot, ListKvView
from flashdecode.naive import attention_reference
from flashdecode.tiling import AttentionError, merge_states

__version__ = "0.1.0"
__all__ = [
    "AttentionError",
    "BatchedKvView",
    "KvCache",
    "KvSlot",
    "ListKvView",
    "attention_reference",
    "batched_flash_attention",
    "flash_attention_forward",
    "get_num_threads",
    "has_openmp",
    "max_threads",
    "merge_states",
    "set_num_threads",
]
