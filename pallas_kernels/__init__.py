"""GPU kernels (Pallas and jax-triton), each next to a pure-JAX reference.
Never imports flare_jax."""
