"""AdamW with a warmup + decay learning-rate schedule, global-norm clipping and decay masks."""
import jax
import optax

SCHEDULES = ('cosine', 'linear', 'constant', 'wsd')


def check_optim_config(optim_cfg, num_steps: int) -> None:
  """Raises ValueError naming the first `optim.*` field out of range."""
  o = optim_cfg
  checks = (
      (o.schedule in SCHEDULES, f'optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}'),
      (o.lr > 0, f'optim.lr must be > 0, got {o.lr}'),
      (o.warmup_steps >= 0, f'optim.warmup_steps must be >= 0, got {o.warmup_steps}'),
      (0 <= o.min_lr_ratio <= 1, f'optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}'),
      (0 < o.decay_fraction <= 1,
       f'optim.decay_fraction must be in (0, 1], got {o.decay_fraction}'),
      (0 <= o.b1 < 1 and 0 <= o.b2 < 1, f'optim.b1 and optim.b2 must be in [0, 1), got '
       f'{o.b1}, {o.b2}'),
      (o.eps > 0, f'optim.eps must be > 0, got {o.eps}'),
      (o.weight_decay >= 0, f'optim.weight_decay must be >= 0, got {o.weight_decay}'),
      (o.grad_accum >= 1, f'optim.grad_accum must be >= 1, got {o.grad_accum}'),
      (num_steps >= 1, f'train.num_steps must be >= 1, got {num_steps}'),
  )
  for ok, message in checks:
    if not ok:
      raise ValueError(message)


def schedule_warning(optim_cfg, num_steps: int) -> str | None:
  """A line for the log when the schedule cannot run as configured, else None."""
  warmup = int(optim_cfg.warmup_steps)
  if warmup >= num_steps:
    return (f'optim.warmup_steps={warmup} >= train.num_steps={num_steps}: the learning rate '
            f'never reaches optim.lr={optim_cfg.lr}')
  if optim_cfg.schedule == 'wsd' and warmup > _wsd_decay_start(optim_cfg, num_steps):
    return (f'optim.warmup_steps={warmup} runs into the wsd decay, which starts at step '
            f'{_wsd_decay_start(optim_cfg, num_steps)}: the decay starts when warmup ends')
  return None


def _wsd_decay_start(optim_cfg, num_steps: int) -> int:
  return num_steps - max(round(optim_cfg.decay_fraction * num_steps), 1)


def learning_rate_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
  """The learning rate at each optimizer step (0-based).

  Linear warmup from 0 to lr over warmup_steps, then per `optim.schedule`: cosine or linear decay to
  lr * min_lr_ratio at num_steps; constant lr; or wsd (lr held until the last decay_fraction of
  num_steps, which decay linearly to lr * min_lr_ratio).
  """
  check_optim_config(optim_cfg, num_steps)
  peak, warmup = optim_cfg.lr, int(optim_cfg.warmup_steps)
  floor = peak * optim_cfg.min_lr_ratio
  after_warmup = max(num_steps - warmup, 1)
  if optim_cfg.schedule == 'cosine':
    rest = optax.cosine_decay_schedule(peak, after_warmup, alpha=optim_cfg.min_lr_ratio)
  elif optim_cfg.schedule == 'linear':
    rest = optax.linear_schedule(peak, floor, after_warmup)
  elif optim_cfg.schedule == 'constant':
    rest = optax.constant_schedule(peak)
  else:  # wsd
    stable = max(_wsd_decay_start(optim_cfg, num_steps) - warmup, 0)
    decay = max(num_steps - warmup - stable, 1)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
  if not warmup:
    return rest
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), rest], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only (kernels, embeddings, conv taps),
  not on norm scales or gate vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
  """The training optimizer; gradients are averaged over micro-batches before it sees them.

  Raises:
    ValueError: an `optim.*` field is out of range (`check_optim_config`).
  """
  schedule = learning_rate_schedule(optim_cfg, num_steps)  # checks every optim field
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(optax.adamw(
      schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
      eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
