"""Jitted batch decoding: AR, AR-Trust (draft + verify) and Diffusion-Trust (parallel denoising)."""
