"""A cached GDN pass of a few tokens in one Pallas kernel: conv, activations, gates and the rule.

`front.fused_decode_xla`'s contract. In XLA that chain is a dozen small kernels per layer and
token pass (conv + SiLU + l2 norm of q, of k, of v, the gates, the window slice, the rule's own
kernels), each a few microseconds at decode sizes; here it is one launch.

One program per (batch row, value head, V tile), as `recurrent_pallas`: it keeps its [K, bv] fp32
state slice in registers and walks the T tokens in a `fori_loop`. Per token it reads the raw
q, k (its key head, whole) and v (its tile) inputs, runs the depthwise conv from a rolling window
of the previous Kc-1 inputs (carried in registers, seeded from the cached window), the SiLU, the
l2 norms and the gates, and then `recurrent_pallas.delta_step`. The q/k front is recomputed by
each of a key head's programs (a few hundred flops; cheaper than a launch). q, k and v are
rounded to the inputs' dtype before the rule, as the model's other paths do.

With the leaving state, each program writes its state slice over the cached one and its part of
the leaving window: the v tile's channels, and the q/k channels of its key head from the head's
first program. Every token runs the same step function whatever T is, so T single-token calls
equal one T-token call bit for bit (GPU-tested): greedy AR-Trust == AR rests on this (the AR step,
the verify pass and the rollback replay, which reruns a pass with its tail marked invalid, all run
this kernel). A one-token call loads nothing ahead; longer ones load each next token's inputs
before storing the current outputs (`recurrent_pallas`).

H200, Qwen3.5-2B-shaped random model, bf16, batch 8, `launch.bench_sampler --new_tokens=128`
(2026-12-03): in one run against XLA's chain, the AR step 1.83 against 2.03 ms (468 launches
against 539), an AR-Trust pass (block 4) 2.39 against 3.62, a Diffusion-Trust pass 2.34 against
3.36 (k = 1) and 3.59 against 6.53 (k = 4). This kernel 18 x 6.6 us per AR step, where the
recurrence kernel alone took 5.7 plus XLA's front fusions. As committed (one-token calls without
load-ahead, 2 warps for noisy blocks; another run): 1.84, 2.45, 2.28 and 3.45 ms; the recurrence
kernel with XLA's front (the code before) 1.95, 2.47, 2.35 and 3.55 ms in a third run.

The inputs may be column ranges of one buffer (`b_col`, `a_col`): the model's decode copy passes
its merged in-projection's product whole, where XLA would slice three operands out of it, a launch
each (same benchmark, 2026-12-04, side by side: AR step 1.74 against 1.81 ms, AR-Trust 2.26
against 2.37, Diffusion-Trust k = 4 3.28 against 3.45).

Calls with the leaving state hold whole value heads (`default_block_v`: a [128, 128] state per
program at 4 warps, 128 programs at 2B's batch 8), which lets two launches per GDN layer go:
- the output gate (`front.OutputGate`, Step E's gated RMS norm) runs in the kernel, its z read in
  place from the merged product;
- without grouped value heads, no program reads channels another writes, so the leaving window
  overwrites the cached one (`window_in_place`) instead of going to a new buffer that XLA copies
  into the decode loop's carry.
`launch.bench_decode --op=fused` (H100, 2B's GDN at batch 8, bf16, 32 chained calls, µs per
call, one run, 2026-12-06): with the state, [128, 32] tiles at 4 warps 11.0 (T=1) / 18.7 (T=4),
[128, 128] at 4 warps 11.3 / 17.4, at 8 warps 14.4 / 53.7. Outputs-only calls (noisy blocks) keep
32-column tiles at 2 warps, as whole heads were slower there (14.7 / 21.4 µs at 4 warps against
10.8 / 17.1 for 32 columns at 4), and their gate runs in XLA after the kernel. `bench_sampler`
(H100, `--batch=8 --new_tokens=128`, alternating processes, 2026-12-06): AR step 1.91 / 1.93 /
1.96 ms against 2.00 / 1.95 / 1.94 before (whole call 2.04 / 2.04 / 2.07 ms a pass against
2.11 / 2.07 / 2.07); AR-Trust (block 4) 2.49 against 2.58 ms a pass; Diffusion-Trust k = 4 3.56
against 3.57.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import backend
from pallas_kernels.gated_delta_rule import front
from pallas_kernels.gated_delta_rule import recurrent_pallas

_F32 = jnp.float32
BLOCK_V = recurrent_pallas.BLOCK_V
NUM_WARPS = recurrent_pallas.NUM_WARPS
# Outputs only (noisy blocks): nothing has to match another call bit for bit, and 2 warps ran
# the recurrence of a 4-token block in 10.8 us against 16.8 at 4 (launch.bench_decode, H200).
NUM_WARPS_OUTPUTS_ONLY = 2
# Calls with the leaving state hold whole value heads when the [K, V] fp32 state tile has at most
# this many elements (128 registers a thread at 4 warps), so that the gated norm can run in the
# kernel and, without grouped heads, the window can be written in place (`window_in_place`).
WHOLE_HEAD_ELEMENTS = 128 * 128


def kernel_takes(num_key_heads: int, key_dim: int, value_dim: int,
                 block_v: int = BLOCK_V) -> str | None:
  """None if the kernel takes these head sizes, else why not."""
  for name, n in (('K', key_dim), ('V', value_dim)):
    if n < 16 or n != backend.next_pow2(n):
      return f'{name}={n} is not a power of two >= 16'
  if (2 * num_key_heads * key_dim) % min(block_v, value_dim):
    return f'the q|k channels (2 x {num_key_heads} x {key_dim}) are not whole V tiles'
  return None


def default_block_v(num_key_heads: int, key_dim: int, value_dim: int, with_state: bool) -> int:
  """V columns per program: whole value heads for calls with the leaving state when the kernel
  takes them and the state tile fits (`WHOLE_HEAD_ELEMENTS`), else BLOCK_V. Every call with the
  state takes the same tiles for given head sizes, so they all reduce in one order (the
  bit-for-bit contract)."""
  if (with_state and key_dim * value_dim <= WHOLE_HEAD_ELEMENTS
      and kernel_takes(num_key_heads, key_dim, value_dim, value_dim) is None):
    return value_dim
  return BLOCK_V


def window_in_place(num_key_heads: int, num_value_heads: int, value_dim: int,
                    block_v: int) -> bool:
  """Whether the leaving conv window can overwrite the cached one: when each program holds a whole
  value head of its own key head, no program reads channels another one writes. Otherwise a key
  head's programs all read its q|k window while one of them writes it, and the window goes to a
  new buffer (which XLA then copies into the decode loop's carry)."""
  return num_value_heads == num_key_heads and block_v >= value_dim


def _kernel(xq_ref, xk_ref, xv_ref, wq_ref, wk_ref, wv_ref, win_ref, b_ref, a_ref, alog_ref,
            dtb_ref, seg_ref, *refs, steps, scale, has_valid, gate_eps, with_state, grp, v_base):
  """Blocks: x* [T, K | bv] inputs, w* [Kc, .] taps, win [Kc-1, C] the cached window (whole
  rows: each program reads its channels); b, a, seg (and valid) [T]; alog, dtb [HV]; with the
  gate (gate_eps not None), z [T, V] and its weight [V]; s0 [K, bv]. Outputs: o [T, bv]; with
  state, s [K, bv] and the leaving window [Kc-1, C] (each program writes its channels)."""
  if has_valid:
    valid_ref, *refs = refs
  if gate_eps is not None:
    z_ref, nw_ref, *refs = refs
  s0_ref, o_ref, *out_refs = refs
  head, tile = pl.program_id(1), pl.program_id(2)
  kc = wq_ref.shape[0]
  kd, bv = xq_ref.shape[-1], xv_ref.shape[-1]
  in_dtype = xq_ref.dtype
  key_head, num_key_heads = head // grp, v_base // (2 * kd)
  v_col = v_base + (head * pl.num_programs(2) + tile) * bv
  # (inputs, taps, window columns) of q (its key head's), k (the same) and v (the program's tile)
  groups = ((xq_ref, wq_ref, pl.ds(key_head * kd, kd)),
            (xk_ref, wk_ref, pl.ds((num_key_heads + key_head) * kd, kd)),
            (xv_ref, wv_ref, pl.ds(v_col, bv)))
  taps = [[w_ref[j, :].astype(_F32) for _, w_ref, _ in groups] for j in range(kc)]
  rate = jnp.exp(alog_ref[head].astype(_F32))
  dt_bias = dtb_ref[head].astype(_F32)
  norm_weight = None if gate_eps is None else nw_ref[...].astype(_F32)
  rounded = lambda x: x.astype(in_dtype).astype(_F32)

  def load(t):
    """Token t's inputs: (q, k, v) rows, b, a, starts-a-document, valid and z (or None)."""
    return (tuple(x_ref[t, :] for x_ref, _, _ in groups), b_ref[t], a_ref[t],
            seg_ref[t] != seg_ref[jnp.maximum(t - 1, 0)],
            (valid_ref[t] != 0) if has_valid else None,
            None if gate_eps is None else z_ref[t, :])

  def step(token, carry):
    x_t, b_t, a_t, start, ok, z_t = token
    s, window, seen = carry  # window: Kc-1 rows (oldest first) of (q, k, v) inputs
    seen = jnp.where(start, 0, seen)  # window rows of this token's document (the newest ones)
    rows = window + (tuple(x.astype(_F32) for x in x_t),)
    pre = []
    for g in range(3):
      acc = 0.0  # taps in `front.causal_conv`'s order
      for j in range(kc):
        tap = rows[j][g] if j == kc - 1 else jnp.where(j >= kc - 1 - seen, rows[j][g], 0.0)
        acc = acc + tap * taps[j][g]
      pre.append(acc * jax.nn.sigmoid(acc))  # SiLU
    q, k, v = pre
    q = rounded(q * jax.lax.rsqrt(jnp.sum(q * q) + front.L2_EPS)) * scale
    k = rounded(k * jax.lax.rsqrt(jnp.sum(k * k) + front.L2_EPS))
    beta = jax.nn.sigmoid(b_t.astype(_F32))
    decay = jnp.exp(-rate * jax.nn.softplus(a_t.astype(_F32) + dt_bias))
    if has_valid:
      decay, beta = jnp.where(ok, decay, 1.0), jnp.where(ok, beta, 0.0)
    decay = jnp.where(start, 0.0, decay)
    o, s_next = recurrent_pallas.delta_step(s, q, k, rounded(v), decay, beta)
    if gate_eps is not None:  # `front.gated_norm` of the outputs rounded as the unfused path's
      o = rounded(o)
      o = o * jax.lax.rsqrt(jnp.mean(o * o) + gate_eps) * norm_weight
      z = z_t.astype(_F32)
      o = o * (z * jax.nn.sigmoid(z))
    shifted, seen_next = rows[1:], jnp.minimum(seen + 1, kc - 1)
    if has_valid:  # a padding token leaves the window where the last real token left it
      shifted = jax.tree.map(lambda new, old: jnp.where(ok, new, old), shifted, window)
      seen_next = jnp.where(ok, seen_next, seen)
    return o, (s_next, shifted, seen_next)

  window = tuple(tuple(win_ref[r, cols].astype(_F32) for _, _, cols in groups)
                 for r in range(kc - 1))
  carry = (s0_ref[...].astype(_F32), window, jnp.int32(kc - 1))
  if steps == 1:  # the AR step: nothing to load ahead
    o, carry = step(load(0), carry)
    o_ref[0, :] = o.astype(o_ref.dtype)
  else:
    # Each step loads the next token's inputs before it computes and stores its own: the compiler
    # cannot move a load above a store that might alias it, so loads behind the previous token's
    # store put a global-memory round trip on every token's critical path.
    def body(t, carry):
      token, state = carry
      ahead = load(jnp.minimum(t + 1, steps - 1))
      o, state = step(token, state)
      o_ref[t, :] = o.astype(o_ref.dtype)
      return ahead, state

    _, carry = jax.lax.fori_loop(0, steps, body, (load(0), carry))
  s, window, _ = carry
  if not with_state:
    return
  s_ref, win_out_ref = out_refs
  s_ref[...] = s
  for r in range(kc - 1):
    win_out_ref[r, groups[2][2]] = window[r][2].astype(win_out_ref.dtype)

  @pl.when((head % grp == 0) & (tile == 0))  # one program writes its key head's q|k channels
  def _():
    for r in range(kc - 1):
      for g in range(2):
        win_out_ref[r, groups[g][2]] = window[r][g].astype(win_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=('b_col', 'a_col', 'z_col', 'gate_eps',
                                             'num_key_heads', 'scale', 'with_state', 'block_v',
                                             'num_warps', 'interpret'))
def _fused(x, b_in, a_in, conv_weight, a_log, dt_bias, window, s0, seg, valid, z_src, norm_weight,
           *, b_col, a_col, z_col, gate_eps, num_key_heads, scale, with_state, block_v, num_warps,
           interpret):
  bsz, t, _ = x.shape
  c = window.shape[-1]
  _, hv, kd, vd = s0.shape
  kc = conv_weight.shape[0]
  grp = hv // num_key_heads
  bv = min(block_v, vd)
  tiles = vd // bv
  v_base = 2 * num_key_heads * kd
  qk = lambda which: (lambda i, j, n: (0, which * num_key_heads + j // grp))
  vb = lambda i, j, n: (0, v_base // bv + j * tiles + n)
  row = lambda f: (lambda i, j, n: (i,) + f(i, j, n))  # the batch row's block of a [B, ...] input
  whole_rows = pl.BlockSpec((None, kc - 1, c), lambda i, j, n: (i, 0, 0))
  in_specs = [
      pl.BlockSpec((None, t, kd), row(qk(0))), pl.BlockSpec((None, t, kd), row(qk(1))),
      pl.BlockSpec((None, t, bv), row(vb)),
      pl.BlockSpec((kc, kd), qk(0)), pl.BlockSpec((kc, kd), qk(1)), pl.BlockSpec((kc, bv), vb),
      whole_rows,
      pl.BlockSpec((None, t, None), lambda i, j, n: (i, 0, b_col + j)),
      pl.BlockSpec((None, t, None), lambda i, j, n: (i, 0, a_col + j)),
      pl.BlockSpec((hv,), lambda i, j, n: (0,)), pl.BlockSpec((hv,), lambda i, j, n: (0,)),
      pl.BlockSpec((None, t), lambda i, j, n: (i, 0))]
  args = [x, x, x, conv_weight, conv_weight, conv_weight]
  window_arg = len(args)  # aliased to the leaving window when it is written in place
  args += [window, b_in, a_in, a_log, dt_bias, seg]
  if valid is not None:
    in_specs.append(pl.BlockSpec((None, t), lambda i, j, n: (i, 0)))
    args.append(valid)
  if gate_eps is not None:  # whole value heads (tiles == 1)
    in_specs += [pl.BlockSpec((None, t, vd), lambda i, j, n: (i, 0, z_col // vd + j)),
                 pl.BlockSpec((vd,), lambda i, j, n: (0,))]
    args += [z_src, norm_weight]
  state_spec = pl.BlockSpec((None, None, kd, bv), lambda i, j, n: (i, j, 0, n))
  in_specs.append(state_spec)
  args.append(s0)
  out_shape = [jax.ShapeDtypeStruct((bsz, t, hv, vd), x.dtype)]
  out_specs = [pl.BlockSpec((None, t, None, bv), lambda i, j, n: (i, 0, j, n))]
  aliases = {}
  if with_state:
    out_shape += [jax.ShapeDtypeStruct(s0.shape, _F32), jax.ShapeDtypeStruct(window.shape,
                                                                               window.dtype)]
    out_specs += [state_spec, whole_rows]
    aliases[len(args) - 1] = 1
    if window_in_place(num_key_heads, hv, vd, block_v):
      aliases[window_arg] = 2
  params = None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  o, *rest = pl.pallas_call(
      functools.partial(_kernel, steps=t, scale=scale, has_valid=valid is not None,
                        gate_eps=gate_eps, with_state=with_state, grp=grp, v_base=v_base),
      out_shape=out_shape, grid=(bsz, hv, tiles), in_specs=in_specs, out_specs=out_specs,
      input_output_aliases=aliases, compiler_params=params, interpret=interpret,
      name='gdn_fused_decode')(*args)
  if not with_state:
    return o, None
  s, leaving = rest
  return o, (leaving, s)


def fused_decode_pallas(x, b_in, a_in, conv_weight, a_log, dt_bias, *, window, initial_state,
                        num_key_heads: int, scale: float | None = None, segment_ids=None,
                        valid=None, output_final_state: bool = True, b_col: int = 0,
                        a_col: int = 0, output_gate: front.OutputGate | None = None,
                        block_v: int | None = None, num_warps: int | None = None,
                        interpret: bool = False):
  """`front.fused_decode_xla`'s contract in one kernel (not differentiable: decoding only).
  The inputs may be column ranges of wider buffers, read in place (`api.fused_decode`'s columns).
  block_v: None is `default_block_v`. The output gate runs in the kernel when its programs hold
  whole value heads and z's columns start at a head (z_col a multiple of V), else in XLA after.
  num_warps: None is NUM_WARPS with the leaving state (every such call must reduce in the same
  order: the bit-for-bit contract), NUM_WARPS_OUTPUTS_ONLY without.

  Raises:
    ValueError: head sizes the kernel does not take (`kernel_takes`).
  """
  kd, vd = initial_state.shape[2:]
  if block_v is None:
    block_v = default_block_v(num_key_heads, kd, vd, output_final_state)
  why = kernel_takes(num_key_heads, kd, vd, block_v)
  if why:
    raise ValueError(f'fused decode kernel: {why}')
  bsz, t, _ = x.shape
  seg = (jnp.zeros((bsz, t), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32))
  valid = None if valid is None else valid.astype(jnp.int32)  # i1 loads: avoided
  if num_warps is None:
    num_warps = NUM_WARPS if output_final_state else NUM_WARPS_OUTPUTS_ONLY
  gate_in_kernel = (output_gate is not None and block_v >= vd and output_gate.z_col % vd == 0)
  z_src, norm_weight, gate_eps, z_col = None, None, None, 0
  if gate_in_kernel:
    z_src, norm_weight, z_col = output_gate.z_src, output_gate.weight, output_gate.z_col
    gate_eps = float(output_gate.eps)
  o, leaving = _fused(x, b_in, a_in, conv_weight, a_log.astype(_F32), dt_bias, window,
                      initial_state.astype(_F32), seg, valid, z_src, norm_weight,
                      b_col=b_col, a_col=a_col, z_col=z_col, gate_eps=gate_eps,
                      num_key_heads=num_key_heads,
                      scale=float(kd ** -0.5 if scale is None else scale),
                      with_state=output_final_state, block_v=block_v, num_warps=num_warps,
                      interpret=interpret)
  if output_gate is not None and not gate_in_kernel:
    o = front.gate_outputs(o, output_gate)
  return o, leaving
