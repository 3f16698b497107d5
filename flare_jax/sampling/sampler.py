"""Jitted batch decoding over the caches: AR, AR-Trust and Diffusion-Trust.

State invariant between iterations: row b's cache holds the clean KV / GDN state of
tokens[b, :length[b] - 1]; tokens[b, length[b] - 1] is the *pending* token, committed but not yet
run through the model. Slot j of every buffer holds position j, so rows never need aligning.

  AR               one clean pass over [pending] -> one token.
  AR-Trust         a noisy pass over [pending, MASK x (B-1)] drafts B tokens (slot p predicts p+1,
                   as in training with logit shift); one clean pass over [pending, d_1..d_B]
                   verifies them; accept the longest agreeing prefix (greedy) or by exact
                   speculative sampling, then one more token from the target. GDN states roll back
                   to the accepted length by a masked replay of the verify pass's recurrence inputs.
  Diffusion-Trust  repeated noisy passes over [pending, y_1..y_{B-1}] (y masked until committed)
                   commit B targets by confidence. One pass then both advances the caches over
                   the finished block (clean) and runs the next block's first noisy pass: the
                   noisy block is seeded by the state right after the clean one, so it is a plain
                   continuation; the GDN states roll back to the end of the clean block.
"""
import dataclasses
import functools
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.model import cache as cache_lib
from flare_jax.model import layers
from flare_jax.model import transformer
from flare_jax.sampling import policies
from pallas_kernels.attention import mask as mask_lib

MODES = ('ar', 'ar_trust', 'diffusion_trust')
COMMIT_RULES = ('threshold', 'fixed', 'factor', 'entropy')


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static decoding policy (hashable: one compile per config and input shape)."""

  mode: str = 'ar'  # 'ar' | 'ar_trust' | 'diffusion_trust'
  block_size: int = 4  # B: draft block (AR-Trust) / denoising block (Diffusion-Trust)
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0
  top_p: float = 1.0
  # Diffusion-Trust's commit rule (each commits at least the most certain slot per pass):
  #   'threshold'  every slot whose confidence is >= threshold
  #   'fixed'      tokens_per_pass slots, the most confident
  #   'factor'     Fast-dLLM: the n most confident, n the largest with (i + 1)(1 - c_i) < factor
  #                for the i-th highest confidences c_i, i <= n
  #   'entropy'    EB-sampler: slots by rising entropy while the entropy before each is
  #                <= entropy_bound
  commit: str = 'threshold'
  threshold: float = 0.9
  tokens_per_pass: int = 1
  factor: float = 1.0
  entropy_bound: float = 0.5  # nats
  eos_ids: tuple[int, ...] = ()
  # 0: sized to the prompts + max_new_tokens; else a hard limit (error if exceeded)
  cache_len: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'unknown mode {self.mode!r}; known: {MODES}')
    if not 1 <= self.block_size <= 32:
      raise ValueError(f'block_size must be in 1..32, got {self.block_size}')
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.commit not in COMMIT_RULES:
      raise ValueError(f'commit must be one of {COMMIT_RULES}, got {self.commit!r}')
    if self.commit == 'fixed' and self.tokens_per_pass < 1:
      raise ValueError(f'tokens_per_pass must be >= 1, got {self.tokens_per_pass}')
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0 (0 = off), got {self.top_k}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')
    if self.commit == 'threshold' and not 0 <= self.threshold <= 1:
      raise ValueError(f'threshold must be in [0, 1], got {self.threshold}')
    if self.commit == 'factor' and not self.factor > 0:
      raise ValueError(f'factor must be > 0, got {self.factor}')
    if self.commit == 'entropy' and not self.entropy_bound >= 0:
      raise ValueError(f'entropy_bound must be >= 0, got {self.entropy_bound}')
    if self.cache_len < 0:
      raise ValueError(f'cache_len must be >= 0 (0 = sized to the prompts), got {self.cache_len}')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def slack(self) -> int:
    """Extra buffer slots so one iteration's writes never run past the end (Diffusion-Trust
    writes a clean block and the next noisy block)."""
    return 2 * self.block_size + 2


@flax.struct.dataclass
class DecodeState:
  tokens: jax.Array  # [B, S] committed tokens (prompt + generated), slot = position
  length: jax.Array  # [B] committed length; tokens[length-1] is pending
  prompt_len: jax.Array  # [B]
  done: jax.Array  # [B] bool
  cache: tuple  # per-layer KVCache / GDNState
  rng: jax.Array
  step: jax.Array  # [] iterations so far
  n_forward: jax.Array  # [B] model passes spent on the row while it was active
  n_drafted: jax.Array  # [B] AR-Trust drafts proposed
  n_accepted: jax.Array  # [B] AR-Trust drafts accepted
  # The next block after its first noisy pass (run with the prefill or the previous advance):
  # Diffusion-Trust's committed targets, or AR-Trust's first drafts (from the prefill only).
  block_targets: jax.Array  # [B, block_size] int32
  block_masked: jax.Array  # [B, block_size] bool, still masked (Diffusion-Trust)


@flax.struct.dataclass
class DecodeResult:
  tokens: jax.Array  # [B, max_new_tokens] generated tokens, pad_id after the end
  num_tokens: jax.Array  # [B] generated tokens (EOS included)
  n_forward: jax.Array  # [B]
  n_drafted: jax.Array  # [B]
  n_accepted: jax.Array  # [B]


@dataclasses.dataclass(frozen=True)
class StreamStats:
  """One streamed row's totals: tokens generated (EOS included), model passes, AR-Trust drafts
  proposed and accepted."""
  tokens: int
  forward_passes: int
  drafted: int
  accepted: int


def completion_ids(tokens, eos_ids: tuple[int, ...]) -> tuple[list[int], bool]:
  """A row's generated ids (its first `num_tokens`, which end at its first EOS if any) without
  that EOS, and whether the row ended at one (else it ran out of tokens)."""
  ids = [int(t) for t in tokens]
  ended = bool(ids) and ids[-1] in eos_ids
  return (ids[:-1] if ended else ids), ended


def _positions(start: jax.Array, t: int) -> jax.Array:
  return start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]


def _clean_meta(start, t):
  pos = _positions(start, t)
  return mask_lib.clean_meta(jnp.zeros_like(pos), pos)


def _noisy_pass(model, block, start, cache):
  """Logits [B, bsz, vocab] of one noisy pass over `block` [B, bsz] seeded at each row's cached
  end; the cache is not advanced (its GDN layers run `GatedDeltaNet.noisy_block`)."""
  bsz = block.shape[1]
  h, _ = model.hidden_states(block, _noisy_meta(start, bsz), cache=cache, noisy_tail=bsz)
  return model.logits(h)


def _noisy_meta(start, t):
  pos = _positions(start, t)
  return mask_lib.TokenMeta(jnp.zeros_like(pos), pos, jnp.ones_like(pos),
                            jnp.broadcast_to(start[:, None], pos.shape))


def _write(buf, new, start):
  return cache_lib.write_rows(buf, new, start)


def _read(buf, start, t):
  return jax.vmap(lambda b, s: jax.lax.dynamic_slice_in_dim(b, s, t, axis=0))(buf, start)


def _freeze(done, old, new):
  """Keeps finished rows unchanged in every per-row leaf (leading dim B) of `new`."""
  def pick(o, n):
    d = done.reshape(done.shape + (1,) * (n.ndim - 1))
    return jnp.where(d, o, n)
  return jax.tree.map(pick, old, new)


# Fields frozen once a row is done. Not the caches: a finished row's cache is never read for any
# output again (rows are independent), and its writes stay inside the buffer because its length is
# frozen; freezing them would read and rewrite every cache leaf at every step.
_ROW_FIELDS = ('tokens', 'length', 'done', 'n_forward', 'n_drafted', 'n_accepted')


def _eos_hit(tokens: jax.Array, count: jax.Array, eos_ids: tuple[int, ...]):
  """First EOS among the first `count` of tokens [B, T]:
  (hit [B], number kept up to and incl. it)."""
  if not eos_ids:
    return jnp.zeros(tokens.shape[:1], bool), count
  is_eos = jnp.isin(tokens, jnp.asarray(eos_ids)) & (
      jnp.arange(tokens.shape[1])[None] < count[:, None])
  hit = jnp.any(is_eos, axis=1)
  first = jnp.argmax(is_eos, axis=1).astype(jnp.int32)
  return hit, jnp.where(hit, first + 1, count)


class Sampler:
  """Batch decoder for a FlareLM.
  Build once; `generate` compiles once per (config, batch, lengths).

  With several `devices`, `generate` is data parallel: the params are replicated onto every device
  once, here, and each device decodes its slice of the batch (the batch padded to a multiple of
  the device count with copies of its last row, which are dropped), with its own sampling key.
  Greedy decoding gives every row the tokens one device gives it.
  """

  def __init__(self, model: transformer.FlareLM, devices: Sequence[jax.Device] | None = None):
    self.graphdef, self.params = nnx.split(model)
    self._structure = _Structure(self.graphdef, jax.tree.structure(self.params))
    self.model_cfg = model.cfg
    self.mesh, self.params = shd.replicate_over(self.params, devices)
    self._decode_structure = None  # traced at the first stream or checked decode

  def _decode_split(self):
    """(structure, params) of the decode model for per-iteration calls: its structure traced
    once per sampler; its params a prepared copy per call (freed with the call), as a flat list
    of arrays (`structure.merge` rebuilds the model), which jit takes in without the Python-level
    flattening of every nnx Variable at every call."""
    if self._decode_structure is None:
      graphdef, treedef = _decode_graphdef(self.graphdef, self.params)
      self._decode_structure = _Structure(graphdef, treedef)
    params = _decode_params(self._structure, self.params)
    return self._decode_structure, jax.tree.leaves(params)

  def generate(self, prompts, prompt_lengths, cfg: SamplerConfig, rng: jax.Array | None = None,
               pad_id: int = 0, *, should_stop: Callable[[int, np.ndarray], bool] | None = None,
               check_every: int = 16) -> DecodeResult:
    """Decodes a batch of right-padded prompts.

    Args:
      prompts: int [B, P] right-padded prompts.
      prompt_lengths: int [B], each in 1..P.
      cfg: decoding policy.
      rng: key for sampling (required when temperature > 0).
      pad_id: filler for generated slots past each row's end.
      should_stop: optional host-side test, `should_stop(row, ids) -> bool`, of a row's generated
        ids so far (e.g. for a stop string in their text). The decode then runs in segments of
        `check_every` iterations; after each, every row still going is tested, and a row it
        answers True for ends there (its result keeps the ids so far). The batch ends as soon as
        every row has. Rows it never stops get exactly the tokens decoding without it gives them.
      check_every: iterations between two tests (with `should_stop`).

    Raises:
      ValueError: empty batch, empty prompt, lengths out of range, ids out of the vocabulary,
        check_every < 1.
    """
    prompts, prompt_lengths, rng = self._validate(prompts, prompt_lengths, cfg, rng)
    mask_id = self.model_cfg.resolved_mask_token_id
    if should_stop is not None:
      if check_every < 1:
        raise ValueError(f'check_every must be >= 1, got {check_every}')
      return self._generate_checked(prompts, prompt_lengths, cfg, rng, pad_id, should_stop,
                                    check_every)
    if self.mesh is None:
      return _generate(self._structure, self.params, prompts, prompt_lengths, rng, cfg=cfg,
                       mask_id=mask_id, pad_id=pad_id)
    return _generate_data_parallel(self._structure, self.params, prompts, prompt_lengths, rng,
                                   cfg=cfg, mask_id=mask_id, pad_id=pad_id, mesh=self.mesh)

  def _generate_checked(self, prompts, prompt_lengths, cfg: SamplerConfig, rng, pad_id: int,
                        should_stop: Callable[[int, np.ndarray], bool],
                        check_every: int) -> DecodeResult:
    """`generate` with `should_stop`: jitted segments of the decode loop, the rows tested on the
    host between them. With a mesh every state leaf leads with the device axis."""
    n, mesh = prompts.shape[0], self.mesh
    if mesh is not None:
      prompts, prompt_lengths = shd.pad_rows((prompts, prompt_lengths), mesh)
    structure, params = self._decode_split()
    static = dict(cfg=cfg, mask_id=self.model_cfg.resolved_mask_token_id, mesh=mesh)
    until = min(check_every, cfg.max_new_tokens)
    state = _begin(structure, params, prompts, prompt_lengths, rng, until, pad_id=pad_id, **static)
    stopped = np.arange(prompts.shape[0]) >= n  # padding rows are never tested
    while True:
      # Copies (np.array), not views: on CPU a fetched array can share its device buffer, and JAX
      # declines to donate a buffer under a live view, so `_resume` would copy the state instead.
      tokens, length, start, done = (
          np.array(x).reshape(-1, *x.shape[2:]) if mesh is not None else np.array(x)
          for x in (state.tokens, state.length, state.prompt_len, state.done))
      for r in np.flatnonzero(~done & ~stopped):
        count = min(int(length[r] - start[r]), cfg.max_new_tokens)
        stopped[r] = bool(should_stop(int(r), tokens[r, start[r]:start[r] + count]))
      if until >= cfg.max_new_tokens or np.all(done | stopped):
        break
      until = min(until + check_every, cfg.max_new_tokens)
      state = _resume(structure, params, state, jnp.asarray(stopped.reshape(state.done.shape)),
                      until, **static)
    return jax.tree.map(lambda x: x[:n], _checked_result(state, cfg=cfg, pad_id=pad_id,
                                                         mesh=mesh))

  def _validate(self, prompts, prompt_lengths, cfg: SamplerConfig, rng):
    prompts = jnp.asarray(prompts, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
      raise ValueError(f'prompts must be a non-empty [B, P] batch, got shape {prompts.shape}')
    if prompt_lengths.shape != prompts.shape[:1]:
      raise ValueError(f'prompt_lengths {prompt_lengths.shape} does not match batch '
                       f'{prompts.shape[0]}')
    lo, hi = int(jnp.min(prompt_lengths)), int(jnp.max(prompt_lengths))
    if lo < 1 or hi > prompts.shape[1]:
      raise ValueError(f'prompt lengths must be in 1..{prompts.shape[1]}, got min {lo} max {hi}')
    vocab = self.model_cfg.vocab_size
    if int(jnp.min(prompts)) < 0 or int(jnp.max(prompts)) >= vocab:
      raise ValueError(f'prompt ids must be in [0, {vocab}), got {int(jnp.min(prompts))}..'
                       f'{int(jnp.max(prompts))}')
    if cfg.temperature > 0 and rng is None:
      raise ValueError('sampling with temperature > 0 needs an rng key')
    need = buffer_len(prompts.shape[1], cfg)
    if cfg.cache_len and need > cfg.cache_len:
      raise ValueError(f'prompt width {prompts.shape[1]} + max_new_tokens {cfg.max_new_tokens} + '
                       f'{cfg.slack} slack = {need} slots exceed cache_len {cfg.cache_len}')
    return prompts, prompt_lengths, jax.random.key(0) if rng is None else rng

  def stream(self, prompt, cfg: SamplerConfig, rng: jax.Array | None = None):
    """Decodes one prompt (a list of ids), yielding the newly committed token ids
    after every iteration; the generator returns the row's `StreamStats` (`StopIteration.value`,
    or `stats = yield from sampler.stream(...)`). Sending it True (`send(True)`, where `next`
    sends None) ends the decoding there, e.g. at a stop string: it then returns at once.

    Each iteration is one jitted call (compiled once), so text can be shown as it is committed.
    """
    prompts, lengths, rng = self._validate([list(prompt)], [len(prompt)], cfg, rng)
    structure, params = self._decode_split()  # once, not per iteration
    state, draft_q = _start(structure, params, prompts, lengths, rng, cfg=cfg, pad_id=0,
                            mask_id=self.model_cfg.resolved_mask_token_id)
    emitted, first, stop = 0, _peels_first_step(cfg), False
    while True:
      state = _advance(structure, params, state, draft_q if first else None, cfg=cfg,
                       mask_id=self.model_cfg.resolved_mask_token_id, first=first)
      first = False
      n_new = min(int(state.length[0] - state.prompt_len[0]), cfg.max_new_tokens)
      if n_new > emitted:
        start = int(state.prompt_len[0]) + emitted
        stop = yield [int(t) for t in state.tokens[0, start:start + n_new - emitted]]
        emitted = n_new
      if stop or bool(state.done[0]) or int(state.step) >= cfg.max_new_tokens:
        return StreamStats(tokens=emitted, forward_passes=int(state.n_forward[0]),
                           drafted=int(state.n_drafted[0]), accepted=int(state.n_accepted[0]))


def buffer_len(prompt_width: int, cfg: SamplerConfig) -> int:
  """Slots of the token buffer and of every cache: prompt, new tokens and
  one iteration's overshoot."""
  return prompt_width + cfg.max_new_tokens + cfg.slack


def _init_state(model, prompts, prompt_lengths, rng, cfg: SamplerConfig, pad_id: int,
                mask_id: int):
  """Prefills everything but each row's last prompt token (it becomes the pending token). For
  Diffusion-Trust and AR-Trust the same call also runs the first noisy pass over
  [pending, MASK x (bsz-1)] (a noisy tail seeded at each row's end): Diffusion-Trust's first block
  starts primed like every later one, and AR-Trust's first step only verifies.

  Returns (state, draft_q): draft_q [B, bsz, vocab] the distributions AR-Trust's first drafts were
  sampled from (None when greedy or in other modes); only the first step reads it, so it is kept
  out of the loop state."""
  b, p = prompts.shape
  s = buffer_len(p, cfg)
  tokens = jnp.full((b, s), pad_id, jnp.int32).at[:, :p].set(prompts)
  cache = cache_lib.init_cache(model.cfg, b, s)
  valid = jnp.arange(p)[None] < (prompt_lengths - 1)[:, None]
  meta = _clean_meta(jnp.zeros((b,), jnp.int32), p)
  bsz = cfg.block_size
  targets, masked = jnp.zeros((b, bsz), jnp.int32), jnp.ones((b, bsz), bool)
  draft_q = None
  if cfg.mode in ('diffusion_trust', 'ar_trust'):
    start = prompt_lengths - 1
    block = jnp.concatenate([jnp.take_along_axis(prompts, start[:, None], axis=1),
                             jnp.full((b, bsz - 1), mask_id, jnp.int32)], axis=1)
    meta = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=1), meta,
                        _noisy_meta(start, bsz))
    h, cache = model.hidden_states(jnp.concatenate([prompts, block], axis=1), meta, cache=cache,
                                   valid=jnp.pad(valid, ((0, 0), (0, bsz)), constant_values=True),
                                   noisy_tail=bsz)
    logits, key = model.logits(h[:, p:]), jax.random.fold_in(rng, 3)  # 0-2: the steps' keys
    if cfg.mode == 'diffusion_trust':
      targets, masked, _ = _denoise_update(logits, targets, masked, key, cfg)
    else:
      targets = policies.sample(key, logits, cfg.temperature, cfg.top_k, cfg.top_p)
      if not cfg.greedy:
        draft_q = policies.probs_of(logits, cfg.temperature, cfg.top_k, cfg.top_p)
  else:
    _, cache = model(prompts, meta=meta, cache=cache, valid=valid)
  zeros = jnp.zeros((b,), jnp.int32)
  return DecodeState(tokens=tokens, length=prompt_lengths, prompt_len=prompt_lengths,
                     done=jnp.zeros((b,), bool), cache=cache, rng=rng,
                     step=jnp.zeros((), jnp.int32), n_forward=zeros + 1, n_drafted=zeros,
                     n_accepted=zeros, block_targets=targets, block_masked=masked), draft_q


def _iteration(model, state: DecodeState, cfg: SamplerConfig, mask_id: int,
               first: bool = False, draft_q: jax.Array | None = None) -> DecodeState:
  """One decode iteration. `first` (static): AR-Trust's first step, whose drafts (sampled from
  draft_q) the prefill made; it is traced apart from the loop body so that the loop carries no
  per-step `lax.cond` (on GPU a conditional waits for its predicate on the host)."""
  if cfg.mode == 'ar_trust':
    return _finish(_ar_trust_step(model, state, cfg=cfg, mask_id=mask_id, first=first,
                                  draft_q=draft_q), cfg)
  step_fn = {'ar': _ar_step, 'diffusion_trust': _diffusion_step}[cfg.mode]
  return _finish(step_fn(model, state, cfg=cfg, mask_id=mask_id), cfg)


def _peels_first_step(cfg: SamplerConfig) -> bool:
  return cfg.mode == 'ar_trust'


def _result(state: DecodeState, cfg: SamplerConfig, pad_id: int) -> DecodeResult:
  n_new = jnp.minimum(state.length - state.prompt_len, cfg.max_new_tokens)
  gen = _read(state.tokens, state.prompt_len, cfg.max_new_tokens)
  gen = jnp.where(jnp.arange(cfg.max_new_tokens)[None] < n_new[:, None], gen, pad_id)
  return DecodeResult(tokens=gen, num_tokens=n_new, n_forward=state.n_forward,
                      n_drafted=state.n_drafted, n_accepted=state.n_accepted)


def _started(model, prompts, prompt_lengths, rng, cfg: SamplerConfig, pad_id: int,
             mask_id: int) -> DecodeState:
  """The state after the prefill (and AR-Trust's peeled first step)."""
  state, draft_q = _init_state(model, prompts, prompt_lengths, rng, cfg, pad_id, mask_id)
  if _peels_first_step(cfg):  # no row is done before it and max_new_tokens >= 1
    state = _iteration(model, state, cfg, mask_id, first=True, draft_q=draft_q)
  return state


def _loop(model, state: DecodeState, cfg: SamplerConfig, mask_id: int,
          until: jax.Array | None = None) -> DecodeState:
  """Iterations until every row is done or max_new_tokens iterations (or `until`) have run."""
  def going(st):
    more = jnp.any(~st.done) & (st.step < cfg.max_new_tokens)
    return more if until is None else more & (st.step < until)
  return jax.lax.while_loop(going, lambda st: _iteration(model, st, cfg, mask_id), state)


@functools.partial(jax.jit, static_argnames=('structure', 'cfg', 'mask_id', 'pad_id'))
def _generate(structure, params, prompts, prompt_lengths, rng, *, cfg: SamplerConfig, mask_id: int,
              pad_id: int) -> DecodeResult:
  model = _decode_model(structure.graphdef, params)
  state = _started(model, prompts, prompt_lengths, rng, cfg, pad_id, mask_id)
  return _result(_loop(model, state, cfg, mask_id), cfg, pad_id)


@functools.partial(jax.jit, static_argnames=('structure', 'cfg', 'mask_id', 'pad_id', 'mesh'))
def _generate_data_parallel(structure, params, prompts, prompt_lengths, rng, *, cfg: SamplerConfig,
                            mask_id: int, pad_id: int, mesh) -> DecodeResult:
  """`_generate` on each device of `mesh`'s data axis for its rows (params replicated). Each
  device loops until its own rows are done; nothing is exchanged between them."""
  def one_device(shared, prompts, prompt_lengths):
    params, rng = shared
    rng = jax.random.fold_in(rng, jax.lax.axis_index(shd.REPLICA_AXIS))
    return _generate(structure, params, prompts, prompt_lengths, rng, cfg=cfg, mask_id=mask_id,
                     pad_id=pad_id)
  return shd.split_rows(one_device, mesh, (params, rng), prompts, prompt_lengths)


# --- The decode in segments (`generate` with `should_stop`). structure, params: from
# `Sampler._decode_split`. With a mesh each device runs its rows' loop, and every leaf of the
# state between segments leads with the device axis (scalars such as `step` become one per device).

def _on_devices(run, mesh, shared, *rows):
  """run(shared, *rows) whole without a mesh; else on every device, which gets the slice [i] of
  each leaf of `rows` (leading with the device axis), and the outputs stacked on that axis."""
  if mesh is None:
    return run(shared, *rows)
  def one_device(shared, *rows):
    out = run(shared, *jax.tree.map(lambda x: x[0], rows))
    return jax.tree.map(lambda x: x[None], out)
  return shd.per_device(one_device, mesh, shared, *rows)


@functools.partial(jax.jit, static_argnames=('structure', 'cfg', 'mask_id', 'pad_id', 'mesh'))
def _begin(structure, params, prompts, prompt_lengths, rng, until, *, cfg: SamplerConfig,
           mask_id: int, pad_id: int, mesh) -> DecodeState:
  """The prefill and the iterations up to `until`; each device's key as in
  `_generate_data_parallel`."""
  def run(shared, prompts, prompt_lengths):
    params, rng, until = shared
    if mesh is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(shd.REPLICA_AXIS))
    model = structure.merge(params)
    state = _started(model, prompts, prompt_lengths, rng, cfg, pad_id, mask_id)
    return _loop(model, state, cfg, mask_id, until)
  if mesh is not None:  # [B] -> [devices, B / devices]
    prompts, prompt_lengths = (x.reshape(mesh.size, -1, *x.shape[1:])
                               for x in (prompts, prompt_lengths))
  return _on_devices(run, mesh, (params, rng, until), prompts, prompt_lengths)


@functools.partial(jax.jit, static_argnames=('structure', 'cfg', 'mask_id', 'mesh'),
                   donate_argnames='state')
def _resume(structure, params, state, stopped, until, *, cfg: SamplerConfig, mask_id: int,
            mesh) -> DecodeState:
  """Ends the `stopped` rows ([B] bool, shaped as state.done) and runs on up to `until`."""
  def run(shared, state, stopped):
    params, until = shared
    model = structure.merge(params)
    return _loop(model, state.replace(done=state.done | stopped), cfg, mask_id, until)
  return _on_devices(run, mesh, (params, until), state, stopped)


@functools.partial(jax.jit, static_argnames=('cfg', 'pad_id', 'mesh'))
def _checked_result(state, *, cfg: SamplerConfig, pad_id: int, mesh) -> DecodeResult:
  if mesh is None:
    return _result(state, cfg, pad_id)
  res = jax.vmap(lambda st: _result(st, cfg, pad_id))(state)
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), res)


def _decode_model(graphdef, params) -> transformer.FlareLM:
  """The model as the decode loop runs it, prepared once before any loop: matmul weights in the
  compute dtype and each mixer's input projections merged into one GEMM. Inside `_generate` the
  merged kernels are a copy beside the given params (2B: ~0.7 GB)."""
  model = nnx.merge(graphdef, params)
  layers.cast_matmul_weights(model)
  model.merge_in_projections()
  return model


@functools.partial(jax.jit, static_argnames='structure')
def _decode_params(structure, params):
  return nnx.split(_decode_model(structure.graphdef, params))[1]


def _decode_graphdef(graphdef, params):
  """(graphdef, params treedef) of `_decode_model`, from an abstract trace (no compile, no
  copy)."""
  out = []
  jax.eval_shape(lambda p: out.append(nnx.split(_decode_model(graphdef, p))), params)
  decode_graphdef, decode_params = out[0]
  return decode_graphdef, jax.tree.structure(decode_params)


def _decode_split(graphdef, params):
  """(graphdef, params) of `_decode_model`; `params` is left as it was (the preparation runs on
  a jitted copy)."""
  return (_decode_graphdef(graphdef, params)[0],
          _decode_params(_Structure(graphdef, jax.tree.structure(params)), params))


class _Structure:
  """A model's GraphDef (and its params' treedef) as a static jit argument, hashed once. jit
  hashes its static arguments at every call, and a GraphDef hashes by walking the whole module
  graph (~2 ms for a 24-layer model): per streamed iteration and per decode segment, that was a
  large share of a step."""
  __slots__ = ('graphdef', 'treedef', '_hash')

  def __init__(self, graphdef, treedef):
    self.graphdef, self.treedef, self._hash = graphdef, treedef, hash(graphdef)

  def merge(self, params):
    """The model from its params: an nnx State, or its leaves in `treedef` order."""
    if isinstance(params, list):
      params = jax.tree.unflatten(self.treedef, params)
    return nnx.merge(self.graphdef, params)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, _Structure) and (self is other or (
        self._hash == other._hash and self.graphdef == other.graphdef
        and self.treedef == other.treedef))


@functools.partial(jax.jit, static_argnames=('structure', 'cfg', 'pad_id', 'mask_id'))
def _start(structure, params, prompts, prompt_lengths, rng, *, cfg, pad_id, mask_id):
  """(state, draft_q) of `_init_state`; structure, params: from `Sampler._decode_split`, as for
  `_advance`."""
  return _init_state(structure.merge(params), prompts, prompt_lengths, rng, cfg,
                     pad_id, mask_id)


@functools.partial(jax.jit, static_argnames=('structure', 'cfg', 'mask_id', 'first'),
                   donate_argnames='state')
def _advance(structure, params, state, draft_q=None, *, cfg, mask_id, first=False):
  return _iteration(structure.merge(params), state, cfg, mask_id, first, draft_q)


def _commit(state: DecodeState, new_tokens, count, cfg: SamplerConfig, cache,
            **stats) -> DecodeState:
  """Appends the first `count` of new_tokens [B, T] to each active row (stopping after an EOS)."""
  hit, count = _eos_hit(new_tokens, count, cfg.eos_ids)
  # Slots past the new length get junk from this write; nothing reads
  # them before they are rewritten.
  new = state.replace(tokens=_write(state.tokens, new_tokens, state.length),
                      length=state.length + count, cache=cache, done=state.done | hit, **stats)
  old_rows = {f: getattr(state, f) for f in _ROW_FIELDS}
  new_rows = {f: getattr(new, f) for f in _ROW_FIELDS}
  return new.replace(**_freeze(state.done, old_rows, new_rows))


def _finish(state: DecodeState, cfg: SamplerConfig) -> DecodeState:
  over = state.length - state.prompt_len >= cfg.max_new_tokens
  return state.replace(done=state.done | over, step=state.step + 1,
                       rng=jax.random.fold_in(state.rng, 1))


def _pending(state: DecodeState) -> jax.Array:
  return jnp.take_along_axis(state.tokens, (state.length - 1)[:, None], axis=1)


def _ar_step(model, state: DecodeState, *, cfg: SamplerConfig, mask_id: int) -> DecodeState:
  del mask_id
  start = state.length - 1
  logits, cache = model(_pending(state), meta=_clean_meta(start, 1), cache=state.cache)
  rng = jax.random.fold_in(state.rng, 0)
  nxt = policies.sample(rng, logits[:, 0], cfg.temperature, cfg.top_k, cfg.top_p)
  one = jnp.ones_like(state.length)
  return _commit(state, nxt[:, None], one, cfg, cache, n_forward=state.n_forward + 1)


def _ar_trust_step(model, state: DecodeState, *, cfg: SamplerConfig, mask_id: int,
                   first: bool, draft_q: jax.Array | None) -> DecodeState:
  bsz = cfg.block_size
  b = state.length.shape[0]
  start = state.length - 1
  pending = _pending(state)
  draft_rng, accept_rng = jax.random.split(jax.random.fold_in(state.rng, 0))

  # --- Draft: one noisy pass; slot i predicts the token at position start + 1 + i. The first
  # step's drafts come from the prefill. ---
  # Greedy decoding needs only tokens: no [B, bsz, vocab] distributions are formed.
  if first:
    drafts, q = state.block_targets, draft_q
  else:
    block = jnp.concatenate([pending, jnp.full((b, bsz - 1), mask_id, jnp.int32)], axis=1)
    q_logits = _noisy_pass(model, block, start, state.cache)
    drafts = policies.sample(draft_rng, q_logits, cfg.temperature, cfg.top_k, cfg.top_p)
    q = None if cfg.greedy else policies.probs_of(q_logits, cfg.temperature, cfg.top_k, cfg.top_p)
  # --- Verify: one clean pass over [pending, drafts]; keep the replay inputs of the GDN layers. ---
  verify = jnp.concatenate([pending, drafts], axis=1)
  p_logits, cache, aux = model(verify, meta=_clean_meta(start, bsz + 1), cache=state.cache,
                               return_gdn_aux=True)
  if cfg.greedy:
    n_acc, nxt = policies.greedy_accept(drafts, jnp.argmax(p_logits, axis=-1).astype(jnp.int32))
  else:
    p = policies.probs_of(p_logits, cfg.temperature, cfg.top_k, cfg.top_p)
    n_acc, nxt = policies.speculative_accept(accept_rng, drafts, q, p)
  # Committed tokens are pending + n accepted drafts; roll the GDN states back to exactly those.
  cache = model.rollback(state.cache, cache, aux, n_acc + 1)
  new_tokens = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
  new_tokens = jnp.where(jnp.arange(bsz + 1)[None] == n_acc[:, None], nxt[:, None], new_tokens)
  return _commit(state, new_tokens, n_acc + 1, cfg, cache,
                 n_forward=state.n_forward + (1 if first else 2),
                 n_drafted=state.n_drafted + bsz, n_accepted=state.n_accepted + n_acc)


def _needed(targets, masked, eos_ids: tuple[int, ...]):
  """Masked slots still worth denoising [B, bsz]: not after a committed EOS (never emitted)."""
  if not eos_ids:
    return masked
  eos = jnp.isin(targets, jnp.asarray(eos_ids)) & ~masked
  after_eos = (jnp.cumsum(eos, axis=1) - eos) > 0
  return masked & ~after_eos


def _denoise_update(logits, targets, masked, rng, cfg: SamplerConfig):
  """One denoising pass's commits from its logits [B, bsz, V]: (targets, masked, active [B]: the
  row still needed the pass), rows with nothing needed left unchanged. Slots after a committed EOS
  stay masked (so they stay [MASK] in the block the other slots see) but are never committed."""
  proposal = policies.sample(rng, logits, cfg.temperature, cfg.top_k, cfg.top_p)
  # Confidence: the proposal's probability; entropy: the distribution's (at temperature 1 when
  # decoding greedily).
  probs = jax.nn.softmax(policies.warp_logits(logits, cfg.temperature or 1.0, cfg.top_k, cfg.top_p))
  conf = jnp.take_along_axis(probs, proposal[..., None], axis=-1)[..., 0]
  needed = _needed(targets, masked, cfg.eos_ids)
  if cfg.commit == 'threshold':
    sel = policies.threshold_commit(conf, needed, cfg.threshold)
  elif cfg.commit == 'fixed':
    sel = policies.top_k_commit(conf, needed, cfg.tokens_per_pass)
  elif cfg.commit == 'factor':
    sel = policies.factor_commit(conf, needed, cfg.factor)
  else:
    sel = policies.entropy_commit(policies.entropy(probs), needed, cfg.entropy_bound)
  active = jnp.any(needed, axis=1)
  sel = sel & active[:, None]
  return jnp.where(sel, proposal, targets), masked & ~sel, active


def _diffusion_step(model, state: DecodeState, *, cfg: SamplerConfig, mask_id: int) -> DecodeState:
  bsz = cfg.block_size
  b = state.length.shape[0]
  start = state.length - 1
  pending = _pending(state)

  # targets[:, j] is the token at position start + 1 + j; slot j+1 of the block holds target j.
  def denoise(carry):
    targets, masked, passes, rng = carry
    block = jnp.concatenate([pending, jnp.where(masked, mask_id, targets)[:, :-1]], axis=1)
    logits = _noisy_pass(model, block, start, state.cache)
    rng, sub = jax.random.split(rng)
    targets, masked, active = _denoise_update(logits, targets, masked, sub, cfg)
    return targets, masked, passes + active.astype(jnp.int32), rng

  # Finished rows need no denoising: they must not keep the loop below going.
  init = (state.block_targets, state.block_masked & ~state.done[:, None],
          jnp.zeros((b,), jnp.int32), jax.random.fold_in(state.rng, 0))
  if cfg.commit == 'fixed':
    # A static pass count: the block's first pass committed k, each later one commits k more
    # (passes after a row's EOS change nothing and are not counted). A known trip count spares
    # XLA:GPU the host round trip for each pass's loop predicate.
    n_pass = -(-bsz // cfg.tokens_per_pass) - 1
    targets, _, passes, _ = jax.lax.fori_loop(0, n_pass, lambda _, c: denoise(c), init)
  else:
    targets, _, passes, _ = jax.lax.while_loop(
        lambda c: jnp.any(_needed(c[0], c[1], cfg.eos_ids)), denoise, init)
  # --- One pass: advance the clean caches over [pending, targets[:-1]] and run the next block's
  # first noisy pass over [targets[-1], MASK x (bsz-1)] right after it. ---
  nxt = jnp.concatenate([targets[:, -1:], jnp.full((b, bsz - 1), mask_id, jnp.int32)], axis=1)
  clean, noisy = _clean_meta(start, bsz), _noisy_meta(start + bsz, bsz)
  meta = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=1), clean, noisy)
  h, after, replays = model.hidden_states(
      jnp.concatenate([pending, targets[:, :-1], nxt], axis=1), meta, cache=state.cache,
      return_gdn_replay=True)
  cache = model.rollback(state.cache, after, replays, jnp.full((b,), bsz, jnp.int32))
  next_targets, next_masked, _ = _denoise_update(
      model.logits(h[:, bsz:]), jnp.zeros_like(targets), jnp.ones_like(state.block_masked),
      jax.random.fold_in(state.rng, 2), cfg)  # the LM head only on the noisy half
  state = state.replace(block_targets=next_targets, block_masked=next_masked)
  return _commit(state, targets, jnp.full((b,), bsz, jnp.int32), cfg, cache,
                 n_forward=state.n_forward + passes + 1)
