"""FlareLM: shapes, packed documents, cached decoding, padding, conv and sharding metadata."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import cache as cache_lib
from flare_jax.model import config as config_lib
from flare_jax.model import layers
from flare_jax.model import transformer
from flare_jax.sampling import sampler as sampler_lib
from pallas_kernels.attention import mask as mask_lib
from pallas_kernels.gated_delta_rule import front

L, F = config_lib.LINEAR, config_lib.FULL


def _model(**overrides):
  cfg = config_lib.VARIANTS['tiny'].replace(**{'dtype': 'float32', **overrides})
  return transformer.FlareLM(cfg, rngs=nnx.Rngs(0)), cfg


def _fwd(model, tokens, **kw):
  """A jitted forward (eager op-by-op dispatch is slow on CPU)."""
  return _jit_forward(model, tokens, **kw)


_jit_forward = nnx.jit(lambda m, t, **kw: m(t, **kw))


def _tokens(rng, b, t, vocab=256):
  return jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_forward_shapes_and_dtypes(dtype, rng):
  model, cfg = _model(dtype=dtype)
  logits, cache = _fwd(model, _tokens(rng, 2, 19))
  assert logits.shape == (2, 19, cfg.vocab_size) and logits.dtype == jnp.float32
  assert cache is None and bool(jnp.all(jnp.isfinite(logits)))
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize('tie', [True, False])
def test_matmul_weights_cast_to_the_compute_dtype_leave_logits_unchanged(rng, tie):
  """fp32 params, bf16 compute: every Dense kernel and the embedding become bf16, and the logits
  are bit-identical (each use casts to bf16 anyway); norms and gates stay fp32."""
  model, _ = _model(dtype='bfloat16', param_dtype='float32', tie_word_embeddings=tie)
  tokens = _tokens(rng, 2, 11)
  want, _ = _fwd(model, tokens)
  cast = nnx.clone(model)
  layers.cast_matmul_weights(cast)
  got, _ = _fwd(cast, tokens)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(cast, nnx.Param)))[0]}
  matmul = [k for k in dtypes if k.endswith("['kernel']") or k.endswith("['embedding']")]
  assert matmul and all(dtypes[k] == jnp.bfloat16 for k in matmul)
  assert {dtypes[k] for k in dtypes if k not in matmul} == {jnp.dtype(jnp.float32)}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  # The sampler casts a copy merged inside jit: its own params stay fp32.
  graphdef, state = nnx.split(model)
  _, decode = sampler_lib._decode_split(graphdef, state)  # pylint: disable=protected-access
  assert {x.dtype for x in jax.tree.leaves(decode)} == {jnp.dtype(jnp.bfloat16),
                                                       jnp.dtype(jnp.float32)}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))


def test_merged_in_projections_leave_forward_and_cached_passes_unchanged(rng):
  """`merge_in_projections` (the sampler's decode copies): one [in, sum of outs] kernel per mixer
  in place of its separate projections, whose weights it holds side by side; the full forward and
  a prefill + one-token cached pass give the same logits."""
  model, _ = _model(layer_types=(L, F, L))
  merged = nnx.clone(model)
  merged.merge_in_projections()
  gdn, attn = merged.layers[0].linear_attn, merged.layers[1].self_attn
  assert not any(hasattr(gdn, n) for n in ('in_proj_qkv', 'in_proj_z', 'in_proj_b', 'in_proj_a'))
  assert not any(hasattr(attn, n) for n in ('q_proj', 'k_proj', 'v_proj'))
  src = model.layers[0].linear_attn
  parts = [src.in_proj_qkv, src.in_proj_z, src.in_proj_b, src.in_proj_a]
  np.testing.assert_array_equal(
      np.asarray(gdn.in_proj.kernel[...]),
      np.concatenate([np.asarray(p.kernel[...]) for p in parts], axis=1))
  tokens = _tokens(rng, 2, 13)
  np.testing.assert_allclose(_fwd(merged, tokens)[0], _fwd(model, tokens)[0], atol=1e-5, rtol=1e-5)
  for m in (model, merged):
    cache = cache_lib.init_cache(m.cfg, batch=2, max_len=16)
    _, cache = _fwd(m, tokens[:, :12], cache=cache)
    step, _ = _fwd(m, tokens[:, 12:], cache=cache,
                   positions=jnp.full((2, 1), 12, jnp.int32))
    if m is model:
      want = step
  np.testing.assert_allclose(step, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('t, noisy', [(1, False), (4, False), (4, True), (2, True)])
def test_attention_cached_call_by_kernels_matches_xla(rng, t, noisy):
  """A decode copy's cached attention call as the decode front kernel and the decode kernel
  (interpreted here; __call__ takes them on GPU) against XLA's ops: outputs and both caches."""
  model, cfg = _model(layer_types=(L, F))
  model.merge_in_projections()
  attn = model.layers[1].self_attn
  for norm in (attn.q_norm, attn.k_norm):  # zero-initialised: give the weights a part to play
    norm.scale.set_value(jnp.asarray(0.2 * rng.standard_normal(cfg.head_dim), jnp.float32))
  b, s = 2, 64
  starts = np.array([5, 40])
  pos = starts[:, None] + np.arange(t)[None]
  field = lambda v: jnp.asarray(np.broadcast_to(v, (b, t)), jnp.int32)
  meta = mask_lib.TokenMeta(field(0), field(pos), field(int(noisy)),
                            field(starts[:, None] if noisy else pos))
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kv = (b, s, cfg.num_key_value_heads, cfg.head_dim)
  cache = cache_lib.KVCache(normal(*kv), normal(*kv))
  x = normal(b, t, cfg.hidden_size)
  want, want_cache = nnx.jit(lambda m, *a: m(*a[:2], cache=a[2]))(attn, x, meta, cache)
  got, got_cache = nnx.jit(lambda m, *a: m.cached_call_by_kernels(*a, interpret=True))(
      attn, x, meta, cache)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_cache.k, want_cache.k, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got_cache.v, want_cache.v)


def test_untied_head_has_its_own_weights(rng):
  model, _ = _model(tie_word_embeddings=False)
  assert hasattr(model, 'lm_head')
  tied, _ = _model()
  assert not hasattr(tied, 'lm_head')
  assert _fwd(model, _tokens(rng, 1, 5))[0].shape[-1] == 272


def test_packed_row_equals_each_document_alone(rng):
  model, _ = _model(layer_types=(L, F, L))
  lengths = [5, 70, 1, 20]  # crosses the GDN chunk (64) and has a one-token document
  docs = [_tokens(rng, 1, n) for n in lengths]
  tokens = jnp.concatenate(docs, axis=1)
  seg = jnp.concatenate([jnp.full((1, n), i + 1, jnp.int32) for i, n in enumerate(lengths)], 1)
  pos = jnp.concatenate([jnp.arange(n, dtype=jnp.int32)[None] for n in lengths], 1)
  packed, _ = _fwd(model, tokens, segment_ids=seg, positions=pos)
  start = 0
  for doc, n in zip(docs, lengths):
    alone, _ = _fwd(model, doc)
    np.testing.assert_allclose(packed[0, start:start + n], alone[0], atol=2e-5, rtol=2e-5)
    start += n


@pytest.mark.parametrize('norm_impl', ['xla', 'pallas'])
def test_prefill_then_decode_matches_full_forward(rng, norm_impl):
  """Cached passes, with every residual add inside the norm after it (one kernel each under
  'pallas', interpret mode off GPU), continue the uncached forward (XLA's adds and norms)."""
  model, cfg = _model(layer_types=(L, F, L, F), norm_impl=norm_impl)
  tokens = _tokens(rng, 2, 50)
  full, _ = _fwd(model, tokens)
  cache = cache_lib.init_cache(cfg, batch=2, max_len=64)
  step = nnx.jit(lambda m, tok, pos, c: m(tok, positions=pos, cache=c))
  pieces, t = [], 0
  for n in (37, 1, 1, 5, 1, 5):  # a chunked prefill, single-token steps and multi-token extends
    pos = jnp.broadcast_to(jnp.arange(t, t + n, dtype=jnp.int32), (2, n))
    logits, cache = step(model, tokens[:, t:t + n], pos, cache)
    pieces.append(logits)
    t += n
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=5e-5, rtol=5e-5)


def test_noisy_block_over_the_cache_matches_an_uncached_two_stream_forward(rng):
  model, cfg = _model(layer_types=(L, F, L))
  prefix_len, blk = 9, 4
  prefix = _tokens(rng, 2, prefix_len)
  block = _tokens(rng, 2, blk).at[:, 1:].set(cfg.resolved_mask_token_id)
  cache = cache_lib.init_cache(cfg, batch=2, max_len=16)
  pos = jnp.broadcast_to(jnp.arange(prefix_len, dtype=jnp.int32), (2, prefix_len))
  _, cache = _fwd(model, prefix, positions=pos, cache=cache)
  bpos = jnp.broadcast_to(jnp.arange(prefix_len, prefix_len + blk, dtype=jnp.int32), (2, blk))
  noisy = mask_lib.TokenMeta(jnp.zeros_like(bpos), bpos, jnp.ones_like(bpos),
                             jnp.full_like(bpos, prefix_len))
  cached, _ = _fwd(model, block, meta=noisy, cache=cache)
  # The same block appended to the clean prefix as a noisy view, without a cache.
  clean = transformer.default_meta(prefix)
  meta = mask_lib.TokenMeta(*(jnp.concatenate([a, b], 1) for a, b in zip(clean, noisy)))
  ref, _ = _fwd(model, jnp.concatenate([prefix, block], 1), meta=meta)
  np.testing.assert_allclose(cached, ref[:, prefix_len:], atol=5e-5, rtol=5e-5)
  # The sampler's noisy pass: the whole call as a noisy tail (GDN layers in the block-parallel
  # form), the cache handed back untouched.
  h, same_cache = nnx.jit(lambda m, t, c: m.hidden_states(t, noisy, cache=c, noisy_tail=blk))(
      model, block, cache)
  np.testing.assert_allclose(model.logits(h), ref[:, prefix_len:], atol=5e-5, rtol=5e-5)
  for got_leaf, want_leaf in zip(jax.tree.leaves(same_cache), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(got_leaf, want_leaf)
  # Bidirectional inside the block: the first slot's logits depend on a later slot's token.
  other, _ = _fwd(model, block.at[:, 3].set(5), meta=noisy, cache=cache)
  assert float(jnp.max(jnp.abs(other[:, 0] - cached[:, 0]))) > 1e-4


def test_gdn_noisy_block_matches_the_recurrence_and_is_exact_for_one_token(rng):
  model, cfg = _model(layer_types=(L,))
  gdn = model.layers[0].linear_attn
  call = nnx.jit(lambda m, x, seg, state: m(x, seg, state=state))  # jitted, as the sampler runs
  noisy_block = nnx.jit(lambda m, x, seg, state: m.noisy_block(x, seg, state))
  state = cache_lib.init_cache(cfg, batch=2, max_len=8)[0]
  x0 = jnp.asarray(rng.standard_normal((2, 6, cfg.hidden_size)), jnp.float32)
  _, state = call(gdn, x0, jnp.zeros((2, 6), jnp.int32), state)  # a non-trivial state and window
  x = jnp.asarray(rng.standard_normal((2, 4, cfg.hidden_size)), jnp.float32)
  seg = jnp.zeros((2, 4), jnp.int32)
  want, _ = call(gdn, x, seg, state)
  np.testing.assert_allclose(noisy_block(gdn, x, seg, state), want, atol=2e-5, rtol=2e-5)
  one, _ = call(gdn, x[:, :1], seg[:, :1], state)
  np.testing.assert_array_equal(noisy_block(gdn, x[:, :1], seg[:, :1], state), one)


def test_right_padded_prefill_continues_each_row_exactly(rng):
  model, cfg = _model(layer_types=(L, F))
  lengths = np.array([7, 12])
  tokens = _tokens(rng, 2, 12)
  valid = jnp.asarray(np.arange(12)[None] < lengths[:, None])
  cache = cache_lib.init_cache(cfg, batch=2, max_len=16)
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  _, cache = _fwd(model, tokens, positions=pos, cache=cache, valid=valid)
  nxt = _tokens(rng, 2, 1)
  step_logits, _ = _fwd(model, nxt, positions=jnp.asarray(lengths[:, None], jnp.int32), cache=cache)
  for b, n in enumerate(lengths):
    seq = jnp.concatenate([tokens[b:b + 1, :n], nxt[b:b + 1]], axis=1)
    ref, _ = _fwd(model, seq)
    np.testing.assert_allclose(step_logits[b, 0], ref[0, -1], atol=5e-5, rtol=5e-5)


def test_prefill_with_a_noisy_tail_equals_prefill_then_a_noisy_pass(rng):
  """One cached call over [right-padded prompts, noisy block]: the cache is the plain prefill's,
  and the block's logits are those of a separate noisy pass over that cache, seeded at each row's
  own end (ragged rows: the padding between prompt and block is skipped)."""
  model, cfg = _model(layer_types=(L, F, L))
  lengths, width, blk = np.array([5, 9]), 9, 3
  tokens = _tokens(rng, 2, width)
  valid = jnp.asarray(np.arange(width)[None] < lengths[:, None])
  block = _tokens(rng, 2, blk).at[:, 1:].set(cfg.resolved_mask_token_id)
  pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (2, width))
  clean = transformer.default_meta(tokens, positions=pos)
  bpos = jnp.asarray(lengths[:, None] + np.arange(blk)[None], jnp.int32)
  noisy = mask_lib.TokenMeta(jnp.zeros_like(bpos), bpos, jnp.ones_like(bpos),
                             jnp.broadcast_to(bpos[:, :1], bpos.shape))
  empty = cache_lib.init_cache(cfg, batch=2, max_len=16)
  _, want_cache = _fwd(model, tokens, meta=clean, cache=empty, valid=valid)
  want, _ = _fwd(model, block, meta=noisy, cache=want_cache)

  meta = mask_lib.TokenMeta(*(jnp.concatenate([a, b], 1) for a, b in zip(clean, noisy)))
  fused = nnx.jit(lambda m, t, c, v: m.hidden_states(t, meta, cache=c, valid=v,
                                                      noisy_tail=blk))
  h, got_cache = fused(model, jnp.concatenate([tokens, block], 1), empty,
                       jnp.concatenate([valid, jnp.ones((2, blk), bool)], 1))
  np.testing.assert_allclose(model.logits(h[:, width:]), want, atol=5e-5, rtol=5e-5)
  for got_leaf, want_leaf in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(got_leaf, want_leaf, atol=1e-6)


def test_causal_conv_matches_a_loop_with_resets_and_window(rng):
  b, t, c, kc = 2, 11, 3, 4
  x = rng.standard_normal((b, t, c)).astype(np.float32)
  w = rng.standard_normal((kc, c)).astype(np.float32)
  window = rng.standard_normal((b, kc - 1, c)).astype(np.float32)
  seg = np.array([[0] * 4 + [1] * 7, [2] * 11], np.int32)
  out, _ = front.causal_conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(seg),
                                      jnp.asarray(window))
  ref = np.zeros((b, t, c))
  for i in range(b):
    for s in range(t):
      for j in range(kc):
        src = s - (kc - 1) + j
        if src >= 0:
          if seg[i, src] == seg[i, s]:
            ref[i, s] += w[j] * x[i, src]
        elif seg[i, s] == seg[i, 0]:  # still in the segment that continues the window
          ref[i, s] += w[j] * window[i, kc - 1 + src]
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


def test_remat_gives_the_same_gradients(rng):
  tokens = _tokens(rng, 1, 9)
  grads = []
  for remat in ('none', 'block'):
    model, _ = _model(remat=remat)
    loss = lambda m: jnp.mean(m(tokens)[0] ** 2)
    grads.append(jax.tree.leaves(nnx.jit(nnx.grad(loss))(model)))
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_params_carry_logical_axes_and_shard_on_a_mesh(cpu_mesh, rng):
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32')
  rules = shd.DEFAULT_RULES
  with jax.set_mesh(cpu_mesh), nnx.logical_axis_rules(rules):
    model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
    kernel = model.layers[0].mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor')
    tokens = _tokens(rng, 4, 16)
    forward = nnx.jit(lambda m, t: m(t)[0])
    sharded = forward(model, tokens)
  single = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(sharded, forward(single, tokens), atol=1e-5, rtol=1e-5)
  specs = jax.tree.leaves(nnx.get_partition_spec(nnx.state(single, nnx.Param)))
  assert len(specs) == len(jax.tree.leaves(nnx.state(single, nnx.Param)))
  for spec in specs:  # every axis name maps through the rules table
    shd.logical_to_pspec(tuple(spec))
