"""jaxtyping aliases shared across the library (dimension letters as in style.md C2)."""
from jaxtyping import Array, Bool, Float, Int

Tokens = Int[Array, 'B T']
SegmentIds = Int[Array, 'B T']
Positions = Int[Array, 'B T']
Hidden = Float[Array, 'B T D']
Logits = Float[Array, 'B T vocab']
TokenMask = Bool[Array, 'B T']
