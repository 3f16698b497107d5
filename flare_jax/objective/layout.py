"""Blocks, slots and targets of a packed row, and the two-stream model input built from them.

Every rule about which slot belongs to which block, which targets a view hides and with what loss
weight lives here; visibility itself lives in `pallas_kernels.attention.mask`. See README.md.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.attention import mask as mask_lib


class BlockLayout(NamedTuple):
  """Per slot p of a row, [B, T]."""

  is_target: jax.Array  # token p is predicted (a response token that is not its document's first)
  block_first_target: jax.Array  # s: first target of the block holding target p (targets only)
  block_last_target: jax.Array  # e: last target of that block
  block_start: jax.Array  # first SLOT of slot p's noisy block (p itself outside blocks)
  maskable: jax.Array  # slot p may be masked in a noisy view
  label: jax.Array  # the token noisy slot p predicts
  label_is_target: jax.Array  # noisy slot p predicts a target
  label_always_hidden: jax.Array  # that target has no slot in its block (hidden in every view)


def targets(segment_ids: jax.Array, response_mask: jax.Array) -> jax.Array:
  """bool [B, T]: token p is a training target (response, in a document, not its first token)."""
  same_doc_as_prev = jnp.concatenate(
      [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] == segment_ids[:, :-1]], 1)
  return response_mask.astype(bool) & same_doc_as_prev & (segment_ids > 0)


def block_layout(tokens, segment_ids, response_mask, *, block_size: int,
                 logit_shift: bool = True) -> BlockLayout:
  """Cuts each run of consecutive targets into blocks of `block_size` targets.

  Logit shift: the block of targets s..e occupies slots s-1..e-1 (slot s-1 holds the real token
  before the block and is never masked; slot p predicts token p+1), so target e has no slot of its
  own.
  No shift: the block occupies slots s..e and slot p predicts token p.
  """
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  tgt = targets(segment_ids, response_mask)
  prev_tgt = jnp.concatenate([jnp.zeros((b, 1), bool), tgt[:, :-1]], 1)
  next_tgt = jnp.concatenate([tgt[:, 1:], jnp.zeros((b, 1), bool)], 1)
  run_start = jax.lax.cummax(jnp.where(tgt & ~prev_tgt, pos, 0), axis=1)
  run_end = jax.lax.cummin(jnp.where(tgt & ~next_tgt, pos, t), axis=1, reverse=True)
  s = run_start + (pos - run_start) // block_size * block_size
  e = jnp.minimum(s + block_size - 1, run_end)
  shift = lambda x, fill: jnp.concatenate([x[:, 1:], jnp.full((b, 1), fill, x.dtype)], 1)
  if logit_shift:
    s_next = shift(s, 0)
    block_start = jnp.where(next_tgt, s_next - 1, pos)
    maskable = next_tgt & (pos >= s_next)  # a target slot of the same block (not the block's first)
    label = shift(tokens, 0)
    label_is_target = next_tgt
    label_always_hidden = next_tgt & (shift(pos, 0) == shift(e, 0))
  else:
    block_start = jnp.where(tgt, s, pos)
    maskable = tgt
    label = tokens
    label_is_target = tgt
    label_always_hidden = jnp.zeros_like(tgt)
  return BlockLayout(tgt, s, e, block_start.astype(jnp.int32), maskable, label, label_is_target,
                     label_always_hidden)


class TwoStreamInput(NamedTuple):
  """A two-stream row: clean stream then V noisy views, [B, (1+V)T] tokens and metadata."""

  tokens: jax.Array
  meta: mask_lib.TokenMeta
  clean_labels: jax.Array  # [B, T] token p+1
  clean_weights: jax.Array  # [B, T] 1 where token p+1 is a target
  noisy_labels: jax.Array  # [B, V, T]
  noisy_weights: jax.Array  # [B, V, T] diffusion loss weight of each noisy slot
  n_targets: jax.Array  # [] response targets in the batch


def two_stream_input(tokens, segment_ids, positions, layout: BlockLayout, masked: jax.Array,
                     mask_id: int, logit_shift: bool = True) -> TwoStreamInput:
  """Assembles the model input from a layout (built with the same logit_shift) and per-view masks
  `masked` [B, V, T] (a subset of layout.maskable)."""
  b, t = tokens.shape
  v = masked.shape[1]
  noisy = jnp.where(masked, mask_id, tokens[:, None])
  # Targets hidden in a view: their own slot is masked there, or they have no slot in their block.
  if logit_shift:  # slot p predicts target p+1, whose own slot is p+1
    hidden = layout.label_always_hidden[:, None] | jnp.concatenate(
        [masked[:, :, 1:], jnp.zeros((b, v, 1), bool)], 2)
  else:
    hidden = masked
  hidden = hidden & layout.label_is_target[:, None]
  n_hidden = jnp.sum(hidden, axis=1, keepdims=True)
  noisy_w = jnp.where(hidden, 1.0 / jnp.maximum(n_hidden, 1), 0.0)
  # Noisy block starts are carried as positions (documents restart their positions).
  start_pos = jnp.take_along_axis(positions, layout.block_start, axis=1)
  clean = mask_lib.clean_meta(segment_ids, positions)
  views = [mask_lib.TokenMeta(segment_ids, positions, jnp.full_like(positions, i + 1), start_pos)
           for i in range(v)]
  meta = mask_lib.TokenMeta(*(jnp.concatenate(parts, 1) for parts in zip(clean, *views)))
  tgt_next = jnp.concatenate([layout.is_target[:, 1:], jnp.zeros((b, 1), bool)], 1)
  clean_labels = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], 1)
  return TwoStreamInput(
      tokens=jnp.concatenate([tokens, noisy.reshape(b, v * t)], 1), meta=meta,
      clean_labels=clean_labels, clean_weights=tgt_next.astype(jnp.float32),
      noisy_labels=jnp.broadcast_to(layout.label[:, None], (b, v, t)),
      noisy_weights=noisy_w.astype(jnp.float32), n_targets=jnp.sum(layout.is_target))

