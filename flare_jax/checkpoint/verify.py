"""Logit parity of a Hugging Face checkpoint (run by transformers) and our converted checkpoint."""
import numpy as np


def transformers_logits(hf_dir: str, tokens: np.ndarray) -> np.ndarray:
  """fp32 logits [B, T, vocab] of the original model in transformers (imports torch lazily)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def flare_logits(ckpt_dir: str, tokens: np.ndarray) -> np.ndarray:
  """fp32 logits of our converted checkpoint, with full-precision matmuls."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from flare_jax.checkpoint import model_io  # pylint: disable=g-import-not-at-top
  model = model_io.load_model(ckpt_dir, dtype='float32', param_dtype='float32')
  with jax.default_matmul_precision('highest'):
    logits, _ = nnx.jit(lambda m, t: m(t))(model, jax.numpy.asarray(tokens))
  return np.asarray(logits)


def random_tokens(vocab: int, batch: int = 2, length: int = 64, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def max_logit_diff(hf_dir: str, ckpt_dir: str, tokens: np.ndarray) -> float:
  return float(np.max(np.abs(transformers_logits(hf_dir, tokens) - flare_logits(ckpt_dir, tokens))))
