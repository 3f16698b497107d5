"""The two-stream objective: stream equalities, no leaks, brute force, schedules, loss accounting."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.objective import corruption
from flare_jax.objective import layout as layout_lib
from flare_jax.objective import two_stream

L, F = config_lib.LINEAR, config_lib.FULL
MASK = 271


def _model(layer_types=(L, F), chunk=16, seed=0):
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', layer_types=layer_types,
                                            gdn_chunk_size=chunk)
  return transformer.FlareLM(cfg, rngs=nnx.Rngs(seed))


def _batch(rng, lengths=(13, 22, 7), prompt=(4, 3, 0), width=None):
  """One packed row: documents with a prompt then a response, padded to `width`."""
  t = width or sum(lengths)
  seg = np.zeros((1, t), np.int32)
  pos = np.zeros((1, t), np.int32)
  resp = np.zeros((1, t), bool)
  start = 0
  for i, (n, p) in enumerate(zip(lengths, prompt)):
    seg[0, start:start + n] = i + 1
    pos[0, start:start + n] = np.arange(n)
    resp[0, start + p:start + n] = True
    start += n
  tok = rng.integers(0, 256, (1, t)).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in dict(tokens=tok, segment_ids=seg, positions=pos,
                                               response_mask=resp).items()}


@functools.partial(nnx.jit, static_argnames=('num_views', 'schedule'))
def _logits(model, tokens, meta, num_views, schedule='lean'):
  h, _ = model.hidden_states(tokens, meta, num_views=num_views, gdn_schedule=schedule)
  return model.logits(h)


def _input(batch, block, views=2, shift=True, seed=0, noise='uniform'):
  cfg = two_stream.ObjectiveConfig(block_size=block, num_views=views, logit_shift=shift, noise=noise)
  return two_stream.build_input(batch, jax.random.key(seed), cfg, MASK), cfg


def test_clean_stream_equals_plain_causal_forward(rng):
  model, batch = _model(), _batch(rng)
  inp, cfg = _input(batch, 4)
  t = batch['tokens'].shape[1]
  two = _logits(model, inp.tokens, inp.meta, 2)
  plain, _ = nnx.jit(lambda m, b: m(b['tokens'], segment_ids=b['segment_ids'],
                                    positions=b['positions']))(model, batch)
  np.testing.assert_allclose(two[:, :t], plain, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('layer_types', [(L, F), (L,), (F,)], ids=['hybrid', 'gdn', 'attn'])
def test_one_token_blocks_with_logit_shift_reproduce_the_clean_logits(rng, layer_types):
  model, batch = _model(layer_types), _batch(rng)
  inp, _ = _input(batch, 1)
  t = batch['tokens'].shape[1]
  two = _logits(model, inp.tokens, inp.meta, 2)
  for v in (1, 2):
    np.testing.assert_allclose(two[:, v * t:(v + 1) * t], two[:, :t], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('block, views, shift', [(1, 2, True), (3, 2, True), (4, 1, False),
                                                 (5, 2, False)],
                         ids=['b1v2', 'b3v2', 'b4v1_noshift', 'b5v2_noshift'])
def test_simple_and_lean_gdn_schedules_agree_with_gradients(rng, block, views, shift):
  model = _model((L,), chunk=16)
  batch = _batch(rng, lengths=(30, 21, 19), prompt=(5, 0, 2))  # docs cross chunk boundaries
  inp, _ = _input(batch, block, views, shift)
  outs, grads = [], []
  for schedule in ('simple', 'lean'):
    f = lambda m: jnp.sum(jnp.sin(_logits(m, inp.tokens, inp.meta, views, schedule)))
    outs.append(_logits(model, inp.tokens, inp.meta, views, schedule))
    grads.append(jax.tree.leaves(nnx.jit(nnx.grad(f))(model)))
  np.testing.assert_allclose(outs[0], outs[1], atol=2e-5, rtol=2e-5)
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4)


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
def test_no_leaks_and_visible_tokens_matter(rng, layer_types):
  model = _model(layer_types)
  batch = _batch(rng, lengths=(20, 26, 10), prompt=(3, 4, 2))
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
  assert changed([t + slots[-1]]) > 1e-3  # the block's last slot (seen by its earlier slots via attn)


def test_brute_force_block_equals_plain_model_on_its_visible_context(rng):
  batch = _batch(rng, lengths=(18, 25), prompt=(3, 5))
  t = batch['tokens'].shape[1]
  inp, _ = _input(batch, 4)
  slots = _pick_block(inp, t, view=1)
  seg = np.asarray(batch['segment_ids'][0])
  doc_start = int(np.argmax(seg == seg[slots[0]]))
  context = np.asarray(batch['tokens'][0, doc_start:slots[0]])
  block = np.asarray(inp.tokens[0, [t + j for j in slots]])
  seq = jnp.asarray(np.concatenate([context, block])[None])
  n = len(context)
  for layer_types, check in (((L,), slice(n, None)), ((F,), slice(-1, None)),
                             ((L, F), slice(-1, None))):
    # GDN is causal inside a block, so a plain causal forward gives every slot; with softmax layers
    # only the block's last slot sees exactly what a causal forward shows it.
    model = _model(layer_types, seed=1)
    two = _logits(model, inp.tokens, inp.meta, 2)[0, [t + j for j in slots]]
    plain, _ = nnx.jit(lambda m, s: m(s))(model, seq)
    np.testing.assert_allclose(two[check.start - n if check.start >= 0 else check.start:],
                               plain[0, check], atol=2e-5, rtol=2e-5, err_msg=str(layer_types))


@pytest.mark.parametrize('noise', ['uniform', 'position_dependent'])
@pytest.mark.parametrize('shift', [True, False], ids=['shift', 'noshift'])
def test_complementary_views_and_token_equal_counts(rng, noise, shift):
  batch = _batch(rng, lengths=(30, 41), prompt=(6, 2))
  lay = layout_lib.block_layout(batch['tokens'], batch['segment_ids'], batch['response_mask'],
                                block_size=5, logit_shift=shift)
  res = corruption.corrupt(jax.random.key(3), lay, num_views=2, schedule=noise)
  m = np.asarray(res.masked[0])
  maskable = np.asarray(lay.maskable[0])
  np.testing.assert_array_equal(m[0] | m[1], maskable)
  assert not (m[0] & m[1]).any()
  inp, _ = _input(batch, 5, 2, shift, seed=3, noise=noise)
  # Every target: exactly one AR term and diffusion weight summing to exactly one.
  t = batch['tokens'].shape[1]
  tgt = np.asarray(lay.is_target[0])
  label_pos = np.arange(t) + (1 if shift else 0)
  per_target = np.zeros(t + 1)
  np.add.at(per_target, label_pos, np.asarray(inp.noisy_weights[0]).sum(0))
  np.testing.assert_allclose(per_target[:t][tgt], 1.0, atol=1e-6)
  assert per_target[:t][~tgt].sum() == 0
  ar = np.zeros(t + 1)
  np.add.at(ar, np.arange(t) + 1, np.asarray(inp.clean_weights[0]))
  np.testing.assert_array_equal(ar[:t] > 0, tgt)
  assert int(inp.n_targets) == tgt.sum()


def test_all_masked_and_block_layout_details(rng):
  batch = _batch(rng, lengths=(12,), prompt=(3,))
  lay = layout_lib.block_layout(batch['tokens'], batch['segment_ids'], batch['response_mask'],
                                block_size=4)
  # targets 3..11 -> blocks {3-6}, {7-10}, {11}; slots 2..5, 6..9, 10.
  np.testing.assert_array_equal(np.asarray(lay.block_start[0]),
                                [0, 1, 2, 2, 2, 2, 6, 6, 6, 6, 10, 11])
  np.testing.assert_array_equal(np.nonzero(np.asarray(lay.maskable[0]))[0], [3, 4, 5, 7, 8, 9])
  res = corruption.corrupt(jax.random.key(0), lay, num_views=1, schedule='all_masked')
  np.testing.assert_array_equal(res.masked[0, 0], lay.maskable[0])


def test_loss_gradient_matches_finite_differences(rng):
  model = _model((L, F))
  batch = _batch(rng, lengths=(10, 9), prompt=(2, 1))
  cfg = two_stream.ObjectiveConfig(block_size=3)
  key = jax.random.key(5)
  loss_fn = lambda m: two_stream.flare_loss(m, batch, key, cfg)[0]
  grads = nnx.jit(nnx.grad(loss_fn))(model)
  graphdef, params = nnx.split(model)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  gflat, _ = jax.flatten_util.ravel_pytree(nnx.state(grads))
  f = jax.jit(lambda x: loss_fn(nnx.merge(graphdef, unravel(x))))
  assert bool(jnp.all(jnp.isfinite(gflat)))
  for i in range(3):
    d = jax.random.normal(jax.random.key(10 + i), flat.shape)
    d = d / jnp.linalg.norm(d)
    eps = 1e-2
    fd = (f(flat + eps * d) - f(flat - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(fd), float(gflat @ d), rtol=2e-2, atol=2e-3)


def test_validation_names_the_problem(rng):
  good = {k: np.asarray(v) for k, v in _batch(rng).items()}
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
  with pytest.raises(ValueError, match='must all be'):
    check(dict(good, response_mask=good['response_mask'][:, :5]))
  with pytest.raises(ValueError, match='block_size must be in 1..32'):
    two_stream.ObjectiveConfig(block_size=0)
  with pytest.raises(ValueError, match='num_views must be 1 or 2'):
    two_stream.ObjectiveConfig(num_views=3)
