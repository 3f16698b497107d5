"""AdamW with linear warmup + cosine decay, global-norm clipping and decay masks."""
import jax
import optax


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr over warmup_steps, then cosine to lr * min_lr_ratio at num_steps."""
  warmup = max(int(optim_cfg.warmup_steps), 0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices only (kernels, embeddings, conv taps),
  not on norm scales or gate vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
  """The training optimizer; gradients are averaged over micro-batches before it sees them."""
  if optim_cfg.grad_accum < 1:
    raise ValueError(f'optim.grad_accum must be >= 1, got {optim_cfg.grad_accum}')
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adamw(
      learning_rate_schedule(optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
      eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
