"""The jitted train step: a pure function of (state, batch, rng), with gradient accumulation."""
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# loss_fn(model, batch, rng) -> (mean loss over the batch's targets, metrics). metrics must hold
# 'n_targets' (the count the mean is over) and may hold other per-batch means (e.g. 'loss_ar').
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _split_micro(batch, accum: int):
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into '
                       f'grad_accum={accum} micro-batches')
    return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
  return jax.tree.map(split, batch)


LATENCY_HIDING = ('auto', 'on', 'off')
_LHS_FLAG = 'xla_gpu_enable_latency_hiding_scheduler'


def compiler_options(latency_hiding: str, scan_layers: bool, mesh: jax.sharding.Mesh,
                     xla_flags: str | None = None) -> dict[str, bool] | None:
  """The train step's XLA options for `train.latency_hiding`: 'on' / 'off' set XLA's GPU
  latency-hiding scheduler (over XLA_FLAGS). 'auto' leaves it to XLA_FLAGS where they name it,
  else turns it off for a scanned step on one GPU, where it has no communication to hide and only
  costs memory (the scanned 0.8B flare step, 4 x 4096 tokens, on an H100: 24.4 GiB instead of
  36.1 at 1,253 ms either way), and otherwise leaves XLA's default. None: no options.

  Args:
    xla_flags: the XLA_FLAGS to read (default: this process's environment).

  Raises:
    ValueError: an unknown setting.
  """
  if latency_hiding not in LATENCY_HIDING:
    raise ValueError(f'train.latency_hiding must be one of {LATENCY_HIDING}, '
                     f'got {latency_hiding!r}')
  if latency_hiding == 'auto':
    flags = os.environ.get('XLA_FLAGS', '') if xla_flags is None else xla_flags
    if _LHS_FLAG in flags or not (scan_layers and mesh.size == 1
                                  and jax.default_backend() == 'gpu'):
      return None
    latency_hiding = 'off'
  return {_LHS_FLAG: latency_hiding == 'on'}


def make_train_step(graphdef, state_shardings, loss_fn: LossFn, grad_accum: int,
                    options: dict[str, bool] | None = None):
  """Returns step(state, batch, rng) -> (state, metrics), jitted with the state donated and
  compiled with XLA `options` (`compiler_options`).

  With accumulation, micro-batch losses are weighted by their target counts, so the step optimises
  the same token-mean loss as one big batch.
  """

  def grads_of(model, batch, rng):
    def weighted(m):
      loss, metrics = loss_fn(m, batch, rng)
      return loss * metrics['n_targets'], metrics
    (total, metrics), grads = nnx.value_and_grad(weighted, has_aux=True)(model)
    return total, metrics, grads

  def step(state, batch, rng):
    model, opt = nnx.merge(graphdef, state)
    if grad_accum == 1:
      total, metrics, grads = grads_of(model, batch, rng)
      weights = {k: metrics['n_targets'] for k in metrics}
      sums = {k: v * metrics['n_targets'] for k, v in metrics.items()}
    else:
      micro = _split_micro(batch, grad_accum)
      zero_grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))

      def body(carry, xs):
        mb, i = xs
        acc_total, acc_grads, acc_sums, acc_n = carry
        total, metrics, grads = grads_of(model, mb, jax.random.fold_in(rng, i))
        n = metrics['n_targets']
        acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
        acc_sums = {k: acc_sums[k] + metrics[k] * n for k in acc_sums}
        return (acc_total + total, acc_grads, acc_sums, acc_n + n), None

      _, shapes, _ = jax.eval_shape(
          lambda: grads_of(model, jax.tree.map(lambda x: x[0], micro), rng))
      sums0 = {k: jnp.zeros((), jnp.float32) for k in shapes}
      (total, grads, sums, n_total), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), zero_grads, sums0, jnp.zeros((), jnp.float32)),
          (micro, jnp.arange(grad_accum)))
      weights = {k: n_total for k in sums}
      metrics = {'n_targets': n_total}
    n = jnp.maximum(metrics['n_targets'], 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    opt.update(model, grads)
    out = {k: sums[k] / jnp.maximum(weights[k], 1.0) for k in sums if k != 'n_targets'}
    out['loss'] = total / n
    out['n_targets'] = metrics['n_targets']
    out['grad_norm'] = optax.tree.norm(grads)
    return nnx.state((model, opt)), out

  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None),
                 compiler_options=options)


def make_eval_step(graphdef, loss_fn: LossFn):
  """Returns evaluate(state, batch, rng) -> metrics of one batch: 'loss' and the loss_fn's
  metrics ('n_targets' included), the model unchanged. Jitted."""

  def evaluate(state, batch, rng):
    model, _ = nnx.merge(graphdef, state)
    loss, metrics = loss_fn(model, batch, rng)
    return dict(metrics, loss=loss)

  return jax.jit(evaluate)


def mean_over_batches(per_batch: list[dict[str, float]]) -> dict[str, float]:
  """Metrics of several batches combined as one: each a mean weighted by the batches' n_targets
  (so the loss is the token mean over all of them); n_targets summed."""
  n = [b['n_targets'] for b in per_batch]
  total = max(sum(n), 1.0)
  out = {k: sum(b[k] * w for b, w in zip(per_batch, n)) / total
         for k in per_batch[0] if k != 'n_targets'}
  out['n_targets'] = sum(n)
  return out
