"""The FLARE training loss (two-stream, token-equal), the plain AR loss and batch validation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flare_jax.model import two_stream_gdn
from flare_jax.objective import corruption
from flare_jax.objective import layout as layout_lib
from flare_jax.objective import losses
from pallas_kernels.attention import mask as mask_lib


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  block_size: int = 4  # B, 1..32
  num_views: int = 2  # V, 1 or 2
  logit_shift: bool = True
  noise: str = 'uniform'  # corruption.NOISE_SCHEDULES
  noise_eps: float = 1e-3
  gdn_schedule: str = 'auto'  # two_stream_gdn.ALL_SCHEDULES (pure JAX or a fused kernel)
  # Sequence tile of the cross-entropy (tokens per row): logits of B x loss_tile tokens exist at
  # once (fp32 [B, tile, vocab]); each tile adds its LM-head gradient to the accumulated one.
  loss_tile: int = 512

  def __post_init__(self):
    if not 1 <= self.block_size <= 32:
      raise ValueError(f'block_size must be in 1..32, got {self.block_size}')
    if self.num_views not in (1, 2):
      raise ValueError(f'num_views must be 1 or 2, got {self.num_views}')
    if self.noise not in corruption.NOISE_SCHEDULES:
      raise ValueError(f'unknown noise {self.noise!r}; known: {corruption.NOISE_SCHEDULES}')
    if not 0 < self.noise_eps < 1:
      raise ValueError(f'noise_eps must be in (0, 1), got {self.noise_eps}')
    if self.loss_tile < 1:
      raise ValueError(f'loss_tile must be >= 1, got {self.loss_tile}')
    if self.gdn_schedule not in two_stream_gdn.ALL_SCHEDULES:
      raise ValueError(f'unknown gdn_schedule {self.gdn_schedule!r}; known: '
                       f'{two_stream_gdn.ALL_SCHEDULES}')


BATCH_KEYS = ('tokens', 'segment_ids', 'positions', 'response_mask')


def validate_batch(batch: dict, *, vocab_size: int, mask_id: int) -> None:
  """Host-side checks of a packed batch (numpy), before it enters the jitted step.

  Raises:
    ValueError: naming the bad values (missing keys, shapes, ids out of range, the MASK id in the
      input, a document split into several runs, positions that do not restart at 0 and count up
      by 1 inside each document).
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f'batch lacks {missing}; has {sorted(batch)}')
  arrs = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
  shapes = {k: a.shape for k, a in arrs.items()}
  if len(set(shapes.values())) != 1 or arrs['tokens'].ndim != 2:
    raise ValueError(f'batch arrays must all be [B, T]; got {shapes}')
  tok, seg, pos = arrs['tokens'], arrs['segment_ids'], arrs['positions']
  if tok.min() < 0 or tok.max() >= vocab_size:
    bad = np.unique(tok[(tok < 0) | (tok >= vocab_size)])[:8]
    raise ValueError(f'token ids out of [0, {vocab_size}): {bad.tolist()}')
  if (tok[seg > 0] == mask_id).any():
    rows = np.unique(np.nonzero((tok == mask_id) & (seg > 0))[0])[:8]
    raise ValueError(f'the MASK id {mask_id} appears in the input tokens (rows {rows.tolist()}); '
                     'it must be reserved (set model.mask_token_id to an id the tokenizer never '
                     'emits)')
  if seg.min() < 0:
    bad = np.unique(seg[seg < 0])[:8]
    raise ValueError(f'segment_ids must be >= 0 (0 = padding); got {bad.tolist()}')
  for r in range(seg.shape[0]):
    runs = seg[r][np.r_[True, seg[r, 1:] != seg[r, :-1]]]
    runs = runs[runs > 0]
    ids, counts = np.unique(runs, return_counts=True)
    if (counts > 1).any():
      split = ids[counts > 1][:8].tolist()
      raise ValueError(f'row {r}: document(s) {split} are split into several runs of segment_ids; '
                       'each document must be one contiguous run')
  same = seg[:, 1:] == seg[:, :-1]
  expected = np.where(same, pos[:, :-1] + 1, 0)
  bad = (seg[:, 1:] > 0) & (pos[:, 1:] != expected)
  bad_first = (seg[:, 0] > 0) & (pos[:, 0] != 0)
  if bad.any() or bad_first.any():
    r, c = (np.nonzero(bad)[0][0], np.nonzero(bad)[1][0] + 1) if bad.any() else (
        np.nonzero(bad_first)[0][0], 0)
    raise ValueError(f'positions must restart at 0 at each document and count up by 1: row {r}, '
                     f'slot {c} has position {pos[r, c]} (segment {seg[r, c]})')


def ar_loss(model, batch: dict, rng=None):
  """Plain next-token loss on the response targets (the cheap data-screening proxy)."""
  del rng
  tokens = batch['tokens']
  tgt = layout_lib.targets(batch['segment_ids'], batch['response_mask'])
  b = tokens.shape[0]
  labels = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], 1)
  weights = jnp.concatenate([tgt[:, 1:], jnp.zeros((b, 1), bool)], 1).astype(jnp.float32)
  h, _ = model.hidden_states(tokens, mask_lib.clean_meta(batch['segment_ids'], batch['positions']))
  n = jnp.maximum(jnp.sum(weights), 1.0)
  nll = losses.weighted_nll_sum(model, h, labels, weights)
  return nll / n, {'loss_ar': nll / n, 'n_targets': jnp.sum(weights)}


def build_input(batch: dict, rng: jax.Array, cfg: ObjectiveConfig,
                mask_id: int) -> layout_lib.TwoStreamInput:
  """Layout + noise + model input of a [B, T] batch: tokens [B, (1+V)T], metadata, loss labels."""
  lay = layout_lib.block_layout(batch['tokens'], batch['segment_ids'], batch['response_mask'],
                                block_size=cfg.block_size, logit_shift=cfg.logit_shift)
  noise = corruption.corrupt(rng, lay, num_views=cfg.num_views, schedule=cfg.noise,
                             eps=cfg.noise_eps)
  return layout_lib.two_stream_input(batch['tokens'], batch['segment_ids'], batch['positions'], lay,
                                     noise.masked, mask_id, cfg.logit_shift)


def two_stream_hidden(model, inp: layout_lib.TwoStreamInput, cfg: ObjectiveConfig) -> jax.Array:
  """Final hidden states [B, (1+V)T, D] of the two-stream pass."""
  return model.hidden_states(inp.tokens, inp.meta, num_views=cfg.num_views,
                             gdn_schedule=cfg.gdn_schedule, max_block=cfg.block_size)[0]


def flare_loss(model, batch: dict, rng: jax.Array, cfg: ObjectiveConfig):
  """Token-equal two-stream loss: (sum AR NLL + sum diffusion NLL) / number of response targets.

  Returns:
    (loss, metrics): metrics hold 'loss_ar' and 'loss_diff' (sums over n_targets, so loss is their
    sum), 'n_targets', and 'hidden_frac_view{v}' (v = 1..V): the fraction of targets view v hides.
    All but n_targets are per-target means, as the train step's accumulation expects.
  """
  inp = build_input(batch, rng, cfg, model.cfg.resolved_mask_token_id)
  h = two_stream_hidden(model, inp, cfg)
  b, t = batch['tokens'].shape
  v = cfg.num_views
  ar = losses.weighted_nll_sum(model, h[:, :t], inp.clean_labels, inp.clean_weights, cfg.loss_tile)
  diff = losses.weighted_nll_sum(model, h[:, t:], inp.noisy_labels.reshape(b, v * t),
                                 inp.noisy_weights.reshape(b, v * t), cfg.loss_tile)
  n = jnp.maximum(inp.n_targets.astype(jnp.float32), 1.0)
  metrics = {'loss_ar': ar / n, 'loss_diff': diff / n,
             'n_targets': inp.n_targets.astype(jnp.float32)}
  for i in range(v):
    metrics[f'hidden_frac_view{i + 1}'] = jnp.sum(inp.noisy_weights[:, i] > 0) / n
  return (ar + diff) / n, metrics
