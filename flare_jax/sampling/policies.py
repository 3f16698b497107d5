"""Token policies shared by the decoding modes: logit warping, speculative acceptance, commit rules
(Diffusion-Trust: threshold, fixed k, Fast-dLLM's factor, entropy-bounded).

All functions are pure, batched and jit-able; probabilities are computed in fp32.
"""
import jax
import jax.numpy as jnp

NEG_INF = -1e30


def warp_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """Temperature, top-k and top-p (nucleus) filtering. temperature == 0 means greedy (unchanged).

  Args:
    logits: [..., vocab].

  Returns:
    fp32 logits with filtered entries at NEG_INF.
  """
  x = logits.astype(jnp.float32)
  if temperature > 0:
    x = x / temperature
  if top_k > 0:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, NEG_INF, x)
  if top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted entry
    keep_sorted = before < top_p  # always keeps the top entry
    keep = jnp.zeros_like(keep_sorted).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
    x = jnp.where(keep, x, NEG_INF)
  return x


def probs_of(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """The sampling distribution [..., vocab] (one-hot of the argmax when temperature == 0)."""
  if temperature == 0:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(warp_logits(logits, temperature, top_k, top_p), axis=-1)


def sample(rng: jax.Array, logits: jax.Array, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Draws tokens [...] from logits [..., vocab] (argmax when temperature == 0)."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(
      rng, warp_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def greedy_accept(drafts: jax.Array, targets: jax.Array):
  """Greedy speculative acceptance: drafts [B, K] are accepted while they equal the target's
  argmax tokens targets [B, K+1]; then the target's token at the first mismatch (or the bonus slot
  K) is appended. Returns (n_accepted [B] in 0..K, next_token [B])."""
  k = drafts.shape[1]
  n = jnp.sum(jnp.cumprod((drafts == targets[:, :k]).astype(jnp.int32), axis=1), axis=1)
  return n.astype(jnp.int32), jnp.take_along_axis(targets, n[:, None], axis=1)[:, 0]


def speculative_accept(rng: jax.Array, drafts: jax.Array, q: jax.Array, p: jax.Array):
  """Exact speculative sampling over K drafts with one extra token from the target.

  Draft i (sampled from q_i) is accepted with probability min(1, p_i(d)/q_i(d)), left to right; at
  the first rejection the replacement is drawn from norm(max(0, p_i - q_i)); if all K are accepted
  the bonus token is drawn from p_K. With one-hot q and p (greedy) this is `greedy_accept`.

  Args:
    rng: key.
    drafts: [B, K] int drafts.
    q: [B, K, vocab] draft distributions the drafts were sampled from.
    p: [B, K+1, vocab] target distributions at the K+1 verify slots.

  Returns:
    (n_accepted [B] in 0..K, next_token [B]).
  """
  b, k = drafts.shape
  u_rng, r_rng = jax.random.split(rng)
  qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(u_rng, (b, k))
  accepted = u * qd < pd  # u < p/q  <=>  u q < p (no division)
  n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)
  p_next = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
  q_next = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros_like(q[:, :1])], 1),
                               n[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p_next - q_next, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  residual = jnp.where(mass > 0, residual / jnp.maximum(mass, 1e-30), p_next)
  next_token = jax.random.categorical(
      r_rng, jnp.where(residual > 0, jnp.log(jnp.maximum(residual, 1e-38)), -jnp.inf))
  return n.astype(jnp.int32), next_token.astype(jnp.int32)


def threshold_commit(confidence: jax.Array, masked: jax.Array, threshold: float) -> jax.Array:
  """Diffusion-Trust rule: commit every masked slot with confidence >= threshold, and at least the
  most confident masked slot of each row that still has one.

  Args:
    confidence: [B, L] probability of each slot's proposed token.
    masked: [B, L] bool, slots still masked.

  Returns:
    bool [B, L] slots to commit (a subset of `masked`).
  """
  conf = jnp.where(masked, confidence, -1.0)
  best = jax.nn.one_hot(jnp.argmax(conf, axis=-1), conf.shape[-1], dtype=bool)
  return masked & ((conf >= threshold) | best)


def _confidence_rank(confidence: jax.Array, masked: jax.Array) -> jax.Array:
  """Each slot's rank [B, L] by confidence among its row's masked slots (0: the most confident;
  unmasked slots after them)."""
  conf = jnp.where(masked, confidence, -1.0)
  return jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)


def top_k_commit(confidence: jax.Array, masked: jax.Array, k: int) -> jax.Array:
  """Fixed schedule: commit the k most confident masked slots of each row
  (fewer if fewer remain)."""
  return masked & (_confidence_rank(confidence, masked) < k)


def factor_commit(confidence: jax.Array, masked: jax.Array, factor: float) -> jax.Array:
  """Fast-dLLM's factor rule: commit the n most confident masked slots of each row, n the largest
  with (i + 1)(1 - c_i) < factor for every i <= n (c_i the i-th highest confidence, from 1), and
  at least the most confident one. Larger factors commit more per pass. Arrays as in
  `threshold_commit`.
  """
  rank = _confidence_rank(confidence, masked)
  # The confidence falls and the bound 1 - factor / (rank + 2) rises with the rank, so the slots
  # that pass are the most confident ones: no running product is needed.
  return masked & ((rank == 0) | ((rank + 2) * (1.0 - confidence) < factor))


def entropy_commit(entropy: jax.Array, masked: jax.Array, bound: float) -> jax.Array:
  """Entropy-bounded rule (EB-sampler): commit the masked slots of each row in order of rising
  entropy while the entropy of those committed before each is <= bound (nats), so at least the
  most certain one; bound 0 commits it alone (and ties at zero entropy).

  Args:
    entropy: [B, L] entropy of each slot's sampling distribution.
    masked: [B, L] bool, slots still masked.

  Returns:
    bool [B, L] slots to commit (a subset of `masked`).
  """
  rank = jnp.argsort(jnp.argsort(jnp.where(masked, entropy, jnp.inf), axis=-1), axis=-1)
  h = jnp.where(masked, entropy, 0.0)
  # before[b, i]: summed entropy of the masked slots ranked before slot i (L is a block: small)
  before = jnp.sum(jnp.where(rank[:, None, :] < rank[:, :, None], h[:, None, :], 0.0), axis=-1)
  return masked & (before <= bound)


def entropy(probs: jax.Array) -> jax.Array:
  """Entropy in nats [...] of distributions probs [..., vocab] (0 log 0 = 0)."""
  return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-38)), 0.0), axis=-1)
