"""The two-stream model pass: stream equalities, no leaks, brute force per block; validation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flare_jax.model import attention
from flare_jax.model import config as config_lib
from flare_jax.objective import two_stream

L, F = config_lib.LINEAR, config_lib.FULL
MASK = 271


@functools.partial(nnx.jit, static_argnames=('num_views',))
def _logits(model, tokens, meta, num_views):
  h, _ = model.hidden_states(tokens, meta, num_views=num_views)
  return model.logits(h)


def _input(batch, block, views=2, shift=True, seed=0, noise='uniform'):
  cfg = two_stream.ObjectiveConfig(block_size=block, num_views=views, logit_shift=shift,
                                   noise=noise)
  return two_stream.build_input(batch, jax.random.key(seed), cfg, MASK), cfg


def test_clean_stream_equals_plain_causal_forward(make_row, make_model):
  model, batch = make_model(), make_row()
  inp, _ = _input(batch, 4)
  t = batch['tokens'].shape[1]
  two = _logits(model, inp.tokens, inp.meta, 2)
  plain, _ = nnx.jit(lambda m, b: m(b['tokens'], segment_ids=b['segment_ids'],
                                    positions=b['positions']))(model, batch)
  np.testing.assert_allclose(two[:, :t], plain, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('layer_types', [(L, F), (L,), (F,)], ids=['hybrid', 'gdn', 'attn'])
def test_one_token_blocks_with_logit_shift_reproduce_the_clean_logits(make_row, make_model,
                                                                      layer_types):
  model, batch = make_model(layer_types), make_row()
  inp, _ = _input(batch, 1)
  t = batch['tokens'].shape[1]
  two = _logits(model, inp.tokens, inp.meta, 2)
  for v in (1, 2):
    np.testing.assert_allclose(two[:, v * t:(v + 1) * t], two[:, :t], atol=2e-5, rtol=2e-5)


def _pick_block(inp, t, view=1):
  """A noisy block of `view` with >= 3 slots that is neither first nor last in its document."""
  starts = np.asarray(inp.meta.block_starts[0, view * t:(view + 1) * t])
  pos = np.asarray(inp.meta.positions[0, :t])
  slot_start = np.arange(t) - (pos - starts)
  blocks = {}
  for j, s in enumerate(slot_start):
    if s != j or (j + 1 < t and slot_start[j + 1] == s):
      blocks.setdefault(int(s), []).append(j)
  candidates = [sorted(v) for v in blocks.values() if len(v) >= 3]
  return candidates[len(candidates) // 2]


@pytest.mark.parametrize('layer_types', [(L, F), (L,), (F,)], ids=['hybrid', 'gdn', 'attn'])
def test_no_leaks_and_visible_tokens_matter(make_row, make_model, layer_types):
  model, batch = make_model(layer_types), make_row()
  t = batch['tokens'].shape[1]
  inp, _ = _input(batch, 4)
  slots = _pick_block(inp, t, view=1)
  first = slots[0]
  seg = np.asarray(batch['segment_ids'][0])
  doc = seg[first]
  block_idx = [t + j for j in slots]
  base = _logits(model, inp.tokens, inp.meta, 2)[0, block_idx]

  def changed(indices):
    toks = np.asarray(inp.tokens).copy()
    toks[0, indices] = (toks[0, indices] + 17) % 250
    out = _logits(model, jnp.asarray(toks), inp.meta, 2)[0, block_idx]
    return float(jnp.max(jnp.abs(out - base)))

  boundary = first  # the block's first slot; it sees clean tokens < boundary
  other_docs = [j for j in range(t) if seg[j] != doc]
  invisible = {
      'other documents': other_docs + [t + j for j in other_docs] + [2 * t + j for j in other_docs],
      'clean at or after the boundary': [j for j in range(boundary, t) if seg[j] == doc],
      'later slots of the view': [t + j for j in range(slots[-1] + 1, t) if seg[j] == doc],
      'earlier blocks of the view': [t + j for j in range(first) if seg[j] == doc],
      'the other view': list(range(2 * t, 3 * t)),
  }
  # Invisible tokens may move the block's logits by float rounding only (~1 ulp: XLA may fuse the
  # hybrid's ops differently); a real dependence moves them by orders of magnitude more.
  for name, idx in invisible.items():
    assert idx, name
    assert changed(idx) <= 1e-6, f'leak from {name}'
  assert changed([boundary - 1]) > 1e-3  # the clean token just before the block
  assert changed([t + slots[-1]]) > 1e-3  # the block's last slot (earlier slots see it via attn)


def _dense_attention(allowed):
  """Softmax attention under a hand-built [S, S] bool mask (ignores the metadata)."""
  def attend(q, k, v, q_meta, k_meta, **unused):
    del q_meta, k_meta, unused
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    s = jnp.einsum('bthd,bshd->bhts', q, k) * q.shape[-1] ** -0.5
    p = jax.nn.softmax(jnp.where(jnp.asarray(allowed), s, -jnp.inf), axis=-1)
    return jnp.einsum('bhts,bshd->bthd', p, v).astype(q.dtype)
  return attend


@pytest.mark.parametrize('layer_types', [(L, F), (L,), (F,), (F, L, F)],
                         ids=['hybrid', 'gdn', 'attn', 'attn_gdn_attn'])
def test_brute_force_block_equals_plain_model_on_its_visible_context(make_row, make_model,
                                                                     monkeypatch, layer_types):
  """A noisy block's logits = the plain model on [its document's clean prefix ++ the block],
  with attention masked by hand: the prefix causal, the block's slots seeing the prefix and the
  whole block (GDN layers run causally over the sequence, which is their two-stream schedule)."""
  batch = make_row()
  t = batch['tokens'].shape[1]
  inp, _ = _input(batch, 4)
  slots = _pick_block(inp, t, view=1)
  seg = np.asarray(batch['segment_ids'][0])
  doc_start = int(np.argmax(seg == seg[slots[0]]))
  context = np.asarray(batch['tokens'][0, doc_start:slots[0]])
  # The view that masks some of the block (complementary views: one of the two does).
  view = 1 if (np.asarray(inp.tokens[0, [t + j for j in slots]]) == MASK).any() else 2
  idx = [view * t + j for j in slots]
  block = np.asarray(inp.tokens[0, idx])
  assert (block == MASK).any() and (block != MASK).any()
  seq = jnp.asarray(np.concatenate([context, block])[None])
  n, m = len(context), len(block)
  allowed = np.tril(np.ones((n + m, n + m), bool))
  allowed[n:] = True
  model = make_model(layer_types, seed=1)
  two = _logits(model, inp.tokens, inp.meta, 2)[0, idx]
  with monkeypatch.context() as mp:
    mp.setattr(attention.attn_ops, 'attention', _dense_attention(allowed))
    plain, _ = nnx.jit(lambda mdl, x: mdl(x))(model, seq)
  np.testing.assert_allclose(two, plain[0, n:], atol=2e-5, rtol=2e-5)
  # Only softmax layers make the block bidirectional: without one, a plain causal forward gives it.
  causal, _ = nnx.jit(lambda mdl, x: mdl(x))(model, seq)
  if F in layer_types:
    assert float(jnp.max(jnp.abs(two[0] - causal[0, n]))) > 1e-3
  else:
    np.testing.assert_allclose(two, causal[0, n:], atol=2e-5, rtol=2e-5)


def test_validation_names_the_problem(make_row):
  good = {k: np.asarray(v) for k, v in make_row().items()}
  check = lambda b: two_stream.validate_batch(b, vocab_size=272, mask_id=MASK)
  check(good)
  bad = dict(good, tokens=good['tokens'].copy())
  bad['tokens'][0, 5] = 300
  with pytest.raises(ValueError, match=r'out of \[0, 272\): \[300\]'):
    check(bad)
  bad['tokens'][0, 5] = MASK
  with pytest.raises(ValueError, match='MASK id 271'):
    check(bad)
  bad = dict(good, positions=good['positions'].copy())
  bad['positions'][0, 14] = 7
  with pytest.raises(ValueError, match='row 0, slot 14'):
    check(bad)
  bad = dict(good, segment_ids=good['segment_ids'].copy())
  bad['segment_ids'][0, 30:33] = 1  # document 1 again inside document 2
  with pytest.raises(ValueError, match=r'row 0: document\(s\) \[1, 2\] are split'):
    check(bad)
  with pytest.raises(ValueError, match='must all be'):
    check(dict(good, response_mask=good['response_mask'][:, :5]))
  with pytest.raises(ValueError, match='block_size must be in 1..32'):
    two_stream.ObjectiveConfig(block_size=0)
  with pytest.raises(ValueError, match='num_views must be 1 or 2'):
    two_stream.ObjectiveConfig(num_views=3)
  with pytest.raises(ValueError, match='loss_tile must be >= 1'):
    two_stream.ObjectiveConfig(loss_tile=0)


def test_config_objective_section_reaches_the_objective():
  """Every field of configs' objective section (but the name) lands in ObjectiveConfig."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from flare_jax.train import objectives  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  c.objective.update(block_size=7, num_views=1, logit_shift=False, noise='all_masked',
                     noise_eps=0.01, gdn_schedule='lean', loss_tile=300)
  got = objectives.objective_config(c)
  for key, value in c.objective.items():
    if key != 'name':
      assert getattr(got, key) == value, key
