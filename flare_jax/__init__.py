"""flare-jax: FLARE (hybrid AR -> diffusion LM conversion) in JAX/Flax."""
