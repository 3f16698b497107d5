"""Jitted batch decoding: AR, AR-Trust (draft + verify) and Diffusion-Trust (parallel denoising).

How the passes are shared (`sampler.py`):
- AR-Trust: the prefill carries the first draft pass.
- Diffusion-Trust: a block's cache advance shares its pass with the next block's first denoising
  pass, and the prefill with the first block's; slots after a committed EOS are not denoised.
- Noisy passes run the GDN layers from the cached state and form no per-token or leaving state:
  the fused decode kernel's outputs-only variant on GPU, XLA's block-parallel form elsewhere.
"""
