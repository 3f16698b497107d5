"""The gated delta rule (Gated DeltaNet's recurrence): chunked, recurrent and
block (noisy decode blocks) forms behind one API."""
from pallas_kernels.gated_delta_rule.api import block_gated_delta_rule
from pallas_kernels.gated_delta_rule.api import chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule.api import fused_decode
from pallas_kernels.gated_delta_rule.api import recurrent_gated_delta_rule

__all__ = ['block_gated_delta_rule', 'chunk_gated_delta_rule', 'fused_decode',
           'recurrent_gated_delta_rule']
