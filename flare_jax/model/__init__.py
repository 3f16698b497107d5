"""The Qwen3.5 hybrid backbone (Gated DeltaNet + gated softmax attention) in Flax NNX."""
from flare_jax.model.config import ModelConfig, VARIANTS, from_hf_config, to_hf_text_config
from flare_jax.model.transformer import FlareLM

__all__ = ['ModelConfig', 'VARIANTS', 'FlareLM', 'from_hf_config', 'to_hf_text_config']
