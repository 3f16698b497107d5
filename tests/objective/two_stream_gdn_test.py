"""GDN noisy-block schedules: both equal a brute-force recurrence per block, agree in gradients, and
agree inside the model."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flare_jax.model import config as config_lib
from flare_jax.model import gated_deltanet
from flare_jax.model import transformer
from flare_jax.model import two_stream_gdn
from flare_jax.objective import layout as layout_lib
from flare_jax.objective import two_stream
from pallas_kernels import gated_delta_rule as gdr
from pallas_kernels.gated_delta_rule import front

H, HV, K, DV, CHUNK = 1, 2, 8, 8, 16
SCALE = K ** -0.5


def _rows(t=52):
  """Two packed rows (documents crossing chunk boundaries, padding) with response masks."""
  seg = np.zeros((2, t), np.int32)
  resp = np.zeros((2, t), bool)
  for r, docs in enumerate([[(0, 23, 4), (23, 45, 0), (45, 52, 2)], [(0, 37, 9), (37, 48, 1)]]):
    for i, (lo, hi, prompt) in enumerate(docs):
      seg[r, lo:hi] = i + 1
      resp[r, lo + prompt:hi] = True
  return seg, resp


def _model_input(rng, obj):
  """The objective's two-stream input for the first row of `_rows`."""
  seg, resp = _rows()
  pos = np.concatenate([np.arange(n) for n in np.unique(seg[0], return_counts=True)[1]])
  batch = dict(tokens=jnp.asarray(rng.integers(0, 256, (1, seg.shape[1])), jnp.int32),
               segment_ids=jnp.asarray(seg[:1]), positions=jnp.asarray(pos[None], jnp.int32),
               response_mask=jnp.asarray(resp[:1]))
  return two_stream.build_input(batch, jax.random.key(0), obj, 271)


def _inputs(rng, b, t, views):
  def qk(*shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  def stream(*lead):
    return (qk(*lead, t, H, K), qk(*lead, t, H, K), rng.normal(size=(*lead, t, HV, DV)),
            -rng.uniform(0.01, 0.5, (*lead, t, HV)), rng.uniform(0.2, 0.9, (*lead, t, HV)))

  to = lambda xs: tuple(jnp.asarray(x, jnp.float32) for x in xs)
  return to(stream(b)), to(stream(b, views))


def _recurrence(q, k, v, g, beta):
  """numpy gated delta rule from a zero state: q, k [S, HV, K], v [S, HV, V] ... -> o [S, HV, V]."""
  state = np.zeros((HV, K, DV))
  out = []
  for t in range(q.shape[0]):
    state = state * np.exp(g[t])[:, None, None]
    d = beta[t][:, None] * (v[t] - np.einsum('hkv,hk->hv', state, k[t]))
    state = state + np.einsum('hk,hv->hkv', k[t], d)
    out.append(np.einsum('hkv,hk->hv', state, q[t]) * SCALE)
  return np.stack(out)


def _brute_force(clean, noisy, seg, starts):
  """Per noisy slot: the recurrence over [its document's clean tokens before its block ++ the
  block's slots of its view up to itself]."""
  clean = [np.repeat(np.asarray(x), HV // H, axis=2) if i < 2 else np.asarray(x)
           for i, x in enumerate(clean)]
  noisy = [np.repeat(np.asarray(x), HV // H, axis=3) if i < 2 else np.asarray(x)
           for i, x in enumerate(noisy)]
  b, views, t = noisy[0].shape[:3]
  out = np.zeros((b, views, t, HV, DV))
  for r in range(b):
    for j in range(t):
      bs = int(starts[r, j])
      doc_start = int(np.argmax(seg[r] == seg[r, j]))
      for v in range(views):
        seq = [np.concatenate([c[r, doc_start:bs], n[r, v, bs:j + 1]])
               for c, n in zip(clean, noisy)]
        out[r, v, j] = _recurrence(*seq)[-1]
  return out


@pytest.mark.parametrize('block, views, shift', [(1, 2, True), (3, 2, True), (5, 1, True),
                                                 (4, 2, False), (32, 2, True)],
                         ids=['b1v2', 'b3v2', 'b5v1', 'b4v2_noshift', 'b32v2'])
def test_both_schedules_equal_a_brute_force_recurrence_per_block(rng, block, views, shift):
  seg, resp = _rows()
  b, t = seg.shape
  lay = layout_lib.block_layout(jnp.zeros((b, t), jnp.int32), jnp.asarray(seg), jnp.asarray(resp),
                                block_size=block, logit_shift=shift)
  starts = np.asarray(lay.block_start)
  clean, noisy = _inputs(rng, b, t, views)
  want = _brute_force(clean, noisy, seg, starts)
  # The numpy recurrence follows the op's conventions: it reproduces the clean chunked op.
  o_clean, _ = jax.jit(gdr.chunk_gated_delta_rule, static_argnames=('scale', 'chunk_size'))(
      *clean, scale=SCALE, segment_ids=jnp.asarray(seg), chunk_size=CHUNK)
  np.testing.assert_allclose(o_clean[0, :23], _recurrence(*(
      np.repeat(np.asarray(x[0, :23]), HV // H, 1) if i < 2 else np.asarray(x[0, :23])
      for i, x in enumerate(clean))), atol=1e-5, rtol=1e-5)
  for schedule in two_stream_gdn.SCHEDULES:
    got = jax.jit(lambda c, n, schedule=schedule: two_stream_gdn.noisy_delta_rule(
        c, n, jnp.asarray(seg), jnp.asarray(starts), scale=SCALE, schedule=schedule,
        chunk_size=CHUNK))(clean, noisy)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=schedule)


def test_simple_and_lean_schedules_have_equal_gradients(rng):
  seg, resp = _rows()
  b, t = seg.shape
  lay = layout_lib.block_layout(jnp.zeros((b, t), jnp.int32), jnp.asarray(seg), jnp.asarray(resp),
                                block_size=6)
  clean, noisy = _inputs(rng, b, t, 2)
  cot = jnp.asarray(rng.normal(size=(b, 2, t, HV, DV)), jnp.float32)

  def grads(schedule):
    f = lambda c, n: jnp.sum(cot * two_stream_gdn.noisy_delta_rule(
        c, n, jnp.asarray(seg), lay.block_start, scale=SCALE, schedule=schedule, chunk_size=CHUNK))
    return jax.tree.leaves(jax.jit(jax.grad(f, argnums=(0, 1)))(clean, noisy))

  simple, lean = grads('simple'), grads('lean')
  names = [f'{s} {x}' for s in ('clean', 'noisy') for x in ('q', 'k', 'v', 'g', 'beta')]
  for name, a, c in zip(names, simple, lean):
    # Noisy outputs depend on every input but the clean queries.
    assert (float(jnp.max(jnp.abs(a))) > 0) == (name != 'clean q'), name
    np.testing.assert_allclose(a, c, atol=2e-5, rtol=2e-5, err_msg=name)


# Every schedule against 'simple'. CI runs the pure-JAX ones and the Pallas forward; the other
# kernel schedules (~60 s more on CI's 2 cores; their kernels are tested against the chunked
# schedule in two_stream_kernel_test) are slow. The fused kernels run in their interpreters here
# (Triton's needs torch).
@pytest.mark.parametrize('schedules', [
    two_stream_gdn.SCHEDULES + ('pallas',),
    pytest.param(('simple',) + tuple(s for s in two_stream_gdn.KERNEL_SCHEDULES if s != 'pallas'),
                 marks=pytest.mark.slow)], ids=['xla_and_pallas', 'other_kernels'])
def test_schedules_agree_inside_the_model_with_parameter_gradients(rng, schedules):
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', layer_types=(config_lib.LINEAR,),
                                            gdn_chunk_size=16)
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  obj = two_stream.ObjectiveConfig(block_size=3, num_views=2)
  inp = _model_input(rng, obj)
  outs, grads = [], []
  assert schedules[0] == 'simple'
  schedules = [s for s in schedules if s != 'triton' or importlib.util.find_spec('torch')]
  for schedule in schedules:
    def f(m, schedule=schedule):
      h, _ = m.hidden_states(inp.tokens, inp.meta, num_views=2, gdn_schedule=schedule,
                             max_block=obj.block_size)
      return jnp.sum(jnp.sin(m.logits(h))), h
    (_, h), g = nnx.jit(nnx.value_and_grad(f, has_aux=True))(model)
    outs.append(h)
    grads.append(jax.tree.leaves(nnx.state(g)))
  for other in range(1, len(outs)):  # every schedule against 'simple'
    np.testing.assert_allclose(outs[other], outs[0], atol=2e-5, rtol=2e-5)
    for a, c in zip(grads[other], grads[0]):
      np.testing.assert_allclose(a, c, atol=2e-4, rtol=2e-4)


def test_auto_schedule_is_the_fused_triton_forward_on_gpu_only(monkeypatch):
  resolve = two_stream_gdn.resolve_schedule
  gpu = jax.default_backend() == 'gpu'
  assert resolve('auto') == ('triton' if gpu else 'chunked')
  assert resolve('auto', jnp.bfloat16, 4) == ('triton_kernel_bwd' if gpu else 'chunked')
  assert resolve('lean', jnp.bfloat16, 4) == 'lean'
  assert two_stream.ObjectiveConfig().gdn_schedule == 'auto'
  if not two_stream_gdn.two_stream_triton.available():
    return
  # The GPU rule on any host: the backward kernels for 16-bit inputs at 16-row tiles only.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert resolve('auto', jnp.bfloat16, 4) == resolve('auto', jnp.float16, 16) == 'triton_kernel_bwd'
  assert resolve('auto', jnp.bfloat16, 17) == 'triton'  # 32-row tiles
  assert resolve('auto', jnp.float32, 4) == resolve('auto') == 'triton'


def test_triton_schedules_share_the_clean_pass_where_the_kernels_take_it():
  """The model's two-stream GDN runs one clean pass for the clean output and the noisy seeds under
  the Triton schedules (checked against the separate passes by
  test_schedules_agree_inside_the_model_with_parameter_gradients, which takes this path)."""
  x = jnp.zeros((1, 40, 1, 16))
  gb = jnp.zeros((1, 40, 1))
  clean = (x, x, x, gb, gb)
  share = two_stream_gdn.shares_clean_pass
  assert share('triton', clean, 16, 3) and share('triton_kernel_bwd', clean, 64, 32)
  assert not share('chunked', clean, 16, 3) and not share('pallas', clean, 16, 3)
  assert not share('triton', clean, 16, 20)  # the fused kernels would chunk at 32
  assert not share('triton', clean, 8, 3)  # a chunk the kernels do not take
  assert not share('triton', clean, 16, 3, 'xla') and share('triton', clean, 16, 3, 'triton')
  assert share('auto', clean, 16, 3) == (jax.default_backend() == 'gpu')
  if jax.default_backend() != 'gpu':  # Triton's interpreter multiplies 16-bit tensors wrongly
    bf16 = tuple(a.astype(jnp.bfloat16) for a in clean[:3]) + clean[3:]
    assert not share('triton', bf16, 16, 3)


def test_both_streams_reach_the_delta_rule_in_the_model_dtype(rng, monkeypatch):
  """The fused kernels choose their launch and products by the inputs' dtype, so a bf16 model must
  hand them bf16 q, k, v in the noisy views as in the clean stream (gates stay fp32)."""
  seen = []
  real = two_stream_gdn.two_stream_delta_rule

  def spy(clean, noisy, *args, **kwargs):
    seen.append([a.dtype.name for a in clean + noisy])
    return real(clean, noisy, *args, **kwargs)

  monkeypatch.setattr(two_stream_gdn, 'two_stream_delta_rule', spy)
  cfg = config_lib.VARIANTS['tiny'].replace(dtype='bfloat16', layer_types=(config_lib.LINEAR,),
                                            gdn_chunk_size=16)
  obj = two_stream.ObjectiveConfig(block_size=3, num_views=1)
  inp = _model_input(rng, obj)
  jax.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0)).hidden_states(  # dtypes only
      inp.tokens, inp.meta, num_views=1, gdn_schedule='chunked', max_block=3)[0])
  assert seen == [(['bfloat16'] * 3 + ['float32'] * 2) * 2]


def test_noisy_conv_is_the_plain_conv_over_each_slots_visible_sequence(rng):
  """Slot i of a view convolves the sequence it sees: clean inputs before its block start, the
  view's inputs from there to i (documents reset the window). Oracle: the clean stream's
  `causal_conv` over that sequence, slot by slot."""
  seg, _ = _rows(t=20)
  seg[0, 17:] = 0  # trailing padding
  b, t, c, kc, views = 2, seg.shape[1], 3, 4, 2
  starts = np.zeros((b, t), np.int32)
  for r in range(b):
    doc_start = 0
    for i in range(t):
      if i and seg[r, i] != seg[r, i - 1]:
        doc_start = i
      starts[r, i] = doc_start + (i - doc_start) // 3 * 3  # blocks of 3 from each document start
  x_clean = rng.normal(size=(b, t, c)).astype(np.float32)
  x_noisy = rng.normal(size=(b, views, t, c)).astype(np.float32)
  w = rng.normal(size=(kc, c)).astype(np.float32)
  got = two_stream_gdn.noisy_conv(jnp.asarray(x_clean), jnp.asarray(x_noisy), jnp.asarray(w),
                                  jnp.asarray(seg), jnp.asarray(starts))
  ahead = np.arange(t)[None, :] >= starts[:, :, None]  # [b, slot i, j]: j is in i's block or later
  for r in range(b):
    for u in range(views):
      # Row i of the batch: what slot i sees (slots after i do not reach i's causal output).
      seen = np.where(ahead[r][..., None], x_noisy[r, u][None], x_clean[r][None])  # [t, t, c]
      want, _ = front.causal_conv(jnp.asarray(seen), jnp.asarray(w),
                                           jnp.asarray(np.repeat(seg[r:r + 1], t, 0)))
      np.testing.assert_allclose(got[r, u], want[np.arange(t), np.arange(t)], atol=1e-5,
                                 rtol=1e-5, err_msg=f'row {r} view {u}')
  # Static shifts both ways: no gather in the forward, no scatter in the backward.
  loss = lambda xc, xn: jnp.sum(two_stream_gdn.noisy_conv(xc, xn, jnp.asarray(w), jnp.asarray(seg),
                                                          jnp.asarray(starts)))
  ops = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x_clean, x_noisy))
  assert 'gather' not in ops and 'scatter' not in ops


@pytest.mark.parametrize('views, dtype, tol', [(1, jnp.float32, 1e-5), (2, jnp.float32, 1e-5),
                                               (2, jnp.bfloat16, 2e-2)])
def test_two_stream_conv_silu_backward_equals_autodiff(rng, views, dtype, tol):
  """The hand-written backward of `two_stream_conv_silu` (backward='manual') against autodiff of
  its forward, for x and the taps: documents (one row with trailing padding), blocks of 3 from
  each document start."""
  seg, _ = _rows(t=20)
  seg[0, 17:] = 0
  b, t, c, kc = 2, seg.shape[1], 5, 4
  doc_start = np.maximum.accumulate(
      np.where(np.diff(seg, axis=1, prepend=-1) != 0, np.arange(t), 0), axis=1)
  starts = jnp.asarray(doc_start + (np.arange(t) - doc_start) // 3 * 3)
  x = jnp.asarray(rng.normal(size=(b, (1 + views) * t, c)), dtype)
  w = jnp.asarray(rng.normal(size=(kc, c)), dtype)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  seg = jnp.asarray(seg)
  conv = lambda backward: lambda x_, w_: gated_deltanet.two_stream_conv_silu(
      x_, w_, seg, starts, views, backward=backward)
  plain, manual = jax.jit(conv('autodiff')), jax.jit(conv('manual'))
  y, pull = jax.vjp(manual, x, w)
  y_ref, pull_ref = jax.vjp(plain, x, w)
  assert y.dtype == jnp.float32
  # The same forward ops, but compiled in two programs: XLA may sum the taps in another order.
  outputs = (('y', y, y_ref),) + tuple(zip(('dx', 'dw'), pull(dy), pull_ref(dy)))
  for name, got, want in outputs:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(want).max() > 0, name
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=tol, err_msg=name)


def test_model_conv_backward_setting_reaches_the_conv(rng, monkeypatch):
  """ModelConfig.gdn_conv_backward picks the short conv's backward in the two-stream pass (the
  backwards themselves are compared above)."""
  seen = []
  real = gated_deltanet.two_stream_conv_silu

  def spy(*args, **kwargs):
    seen.append(kwargs.get('backward'))
    return real(*args, **kwargs)

  monkeypatch.setattr(gated_deltanet, 'two_stream_conv_silu', spy)
  obj = two_stream.ObjectiveConfig(block_size=3, num_views=2)
  inp = _model_input(rng, obj)
  for backward in config_lib.GDN_CONV_BACKWARDS:
    cfg = config_lib.VARIANTS['tiny'].replace(dtype='float32', layer_types=(config_lib.LINEAR,),
                                              gdn_chunk_size=16, gdn_conv_backward=backward)
    jax.eval_shape(lambda m: m.hidden_states(inp.tokens, inp.meta, num_views=2,
                                             gdn_schedule='chunked', max_block=3),
                   transformer.FlareLM(cfg, rngs=nnx.Rngs(0)))
  assert seen == list(config_lib.GDN_CONV_BACKWARDS)
  with pytest.raises(ValueError, match='gdn_conv_backward'):
    config_lib.VARIANTS['tiny'].replace(gdn_conv_backward='fused')
