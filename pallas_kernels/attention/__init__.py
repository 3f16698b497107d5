"""Softmax attention whose visibility comes from per-token metadata
(plain causal, packed, two-stream)."""
from pallas_kernels.attention.api import attention, cache_attention, front_kernels_take
from pallas_kernels.attention.mask import TokenMeta, clean_meta, visible

__all__ = ['TokenMeta', 'attention', 'cache_attention', 'clean_meta', 'front_kernels_take',
           'visible']
