"""A residual add fused with the zero-centred RMSNorm that reads its sum (Qwen3.5's pre-norm)."""
from pallas_kernels.add_rms_norm.api import IMPLEMENTATIONS, add_rms_norm
from pallas_kernels.add_rms_norm.xla import rms_norm, rms_normalize

__all__ = ['IMPLEMENTATIONS', 'add_rms_norm', 'rms_norm', 'rms_normalize']
