"""Jitted batch evaluation: generation per decoding mode, log-likelihood choices, perplexity.

Every generation batch has the same shape (prompts right-padded to one width, the last batch filled
with repeats that are not scored), so each mode compiles once per task. Speed figures exclude that
compile: the first batch is run once untimed.
"""
import concurrent.futures
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from flare_jax import sharding as shd
from flare_jax.eval import scorers
from flare_jax.objective import two_stream
from flare_jax.sampling import sampler as sampler_lib
from flare_jax.sampling import stop_strings
from flare_jax.train import step as step_lib


@dataclasses.dataclass
class GenerationStats:
  """Totals over the scored sequences of one mode."""

  seconds: float = 0.0
  tokens: int = 0
  forward_passes: int = 0  # decode passes (prefill not counted)
  drafted: int = 0
  accepted: int = 0

  def summary(self) -> dict[str, float]:
    return {
        'tokens_per_s': self.tokens / self.seconds if self.seconds else 0.0,
        'passes_per_token': self.forward_passes / max(self.tokens, 1),
        'acceptance_rate': self.accepted / self.drafted if self.drafted else float('nan'),
        'tokens': self.tokens,
    }


def progress(prefix: str) -> Callable[[int, int], None]:
  """A one-line progress bar on stderr: call with (done, total)."""
  def show(done: int, total: int) -> None:
    width = 30
    fill = width * done // max(total, 1)
    end = '\n' if done >= total else ''
    sys.stderr.write(f'\r{prefix} [{"#" * fill}{"." * (width - fill)}] {done}/{total}{end}')
    sys.stderr.flush()
  return show


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _fill(chunk: list, batch_size: int) -> list:
  """The last batch filled to `batch_size` with repeats of its last row (one compiled shape)."""
  return chunk + [chunk[-1]] * (batch_size - len(chunk))


def _padded(rows: list[list[int]], pad_id: int, multiple: int = 64, width: int = 0):
  """Right-padded int32 [N, W] (W `width`, else a multiple of `multiple`) and lengths [N]."""
  width = width or _round_up(max(map(len, rows)), multiple)
  out = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, np.array([len(r) for r in rows], np.int32)


def encode_prompts(tokenizer, texts: Sequence[str], max_prompt_len: int, multiple: int = 32):
  """Right-padded [N, W] prompt ids (W a multiple of `multiple`) and lengths [N]; prompts longer
  than `max_prompt_len` keep their last tokens. Raises ValueError on an empty prompt."""
  ids = []
  for i, text in enumerate(texts):
    row = tokenizer.encode(text)[-max_prompt_len:]
    if not row:
      raise ValueError(f'prompt {i} encodes to no tokens')
    ids.append(row)
  return _padded(ids, tokenizer.pad_id, multiple)


def generate_texts(model, tokenizer, prompts: Sequence[str], cfg: sampler_lib.SamplerConfig, *,
                   batch_size: int = 16, max_prompt_len: int = 512, seed: int = 0,
                   on_progress: Callable[[int, int], None] | None = None,
                   sampler: sampler_lib.Sampler | None = None,
                   stops: Sequence[Sequence[str]] | None = None):
  """Decodes every prompt with `cfg` (through `sampler`, else a one-device Sampler of `model`).
  `stops`: each prompt's stop strings; a row ends soon after its text holds one (the outputs are
  not cut here). Returns (output texts, GenerationStats)."""
  ids, lengths = encode_prompts(tokenizer, prompts, max_prompt_len)
  n = len(prompts)
  pad = (-n) % batch_size
  ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
  lengths = np.concatenate([lengths, np.repeat(lengths[-1:], pad)])
  sampler = sampler or sampler_lib.Sampler(model)
  rng = jax.random.key(seed)
  batches = len(ids) // batch_size
  # The keys before the clock starts (fold_in compiles on its first call), then the first batch
  # once untimed: it compiles the decode.
  keys = [jax.random.fold_in(rng, i) for i in range(batches)]
  checked = stops is not None and any(stops)
  def stop_test(i):  # batch i's rows: its prompts', then filler that stops at once
    return (stop_strings.stop_test(tokenizer.decode, stops[i * batch_size:(i + 1) * batch_size])
            if checked else None)
  jax.device_get(sampler.generate(ids[:batch_size], lengths[:batch_size], cfg, keys[0],
                                  should_stop=(lambda r, ids: False) if checked else None))
  stats, outputs = GenerationStats(), []
  for i in range(batches):
    sl = slice(i * batch_size, (i + 1) * batch_size)
    t0 = time.perf_counter()
    res = jax.device_get(sampler.generate(ids[sl], lengths[sl], cfg, keys[i],
                                          should_stop=stop_test(i)))
    stats.seconds += time.perf_counter() - t0
    keep = min(batch_size, n - i * batch_size)
    for b in range(keep):
      count = int(res.num_tokens[b])
      kept, _ = sampler_lib.completion_ids(res.tokens[b, :count], cfg.eos_ids)
      outputs.append(tokenizer.decode(kept))
    stats.tokens += int(res.num_tokens[:keep].sum())
    stats.forward_passes += int((res.n_forward[:keep] - 1).sum())
    stats.drafted += int(res.n_drafted[:keep].sum())
    stats.accepted += int(res.n_accepted[:keep].sum())
    if on_progress:
      on_progress(i + 1, batches)
  return outputs, stats


def _next_token_logprobs(model, tokens, lengths):
  """log p(tokens[:, t+1] | tokens[:, :t+1]) [B, T-1], zero past each row's length."""
  logits, _ = model(tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  valid = jnp.arange(1, tokens.shape[1])[None] < lengths[:, None]
  return jnp.where(valid, picked, 0.0)


def _last_logits(model, tokens, lengths):
  """Next-token logits after each row's last token: [B, vocab] fp32 (rows right-padded)."""
  logits, _ = model(tokens)
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], 1)[:, 0].astype(jnp.float32)


class Scorer:
  """Clean forward passes that score right-padded rows (tokens int [B, T], lengths int [B]), data
  parallel over `devices` when several: the params are replicated onto each once, here, and each
  device scores its slice of every batch. Compiles once per batch shape."""

  def __init__(self, model, devices: Sequence[jax.Device] | None = None):
    self.graphdef, params = nnx.split(model)
    self.mesh, self.params = shd.replicate_over(params, devices)

  def next_token_logprobs(self, tokens, lengths) -> np.ndarray:
    """[B, T-1] fp32: log p(tokens[:, t+1] | tokens[:, :t+1]), zero past each row's length."""
    return self._run(_next_token_logprobs, tokens, lengths)

  def last_logits(self, tokens, lengths) -> np.ndarray:
    """[B, vocab] fp32: the next-token logits after each row's last token."""
    return self._run(_last_logits, tokens, lengths)

  def _run(self, fn, tokens, lengths) -> np.ndarray:
    return np.asarray(_score(fn, self.graphdef, self.params, jnp.asarray(tokens, jnp.int32),
                             jnp.asarray(lengths, jnp.int32), mesh=self.mesh))


@functools.partial(jax.jit, static_argnames=('fn', 'graphdef', 'mesh'))
def _score(fn, graphdef, params, tokens, lengths, *, mesh):
  one_device = lambda params, tokens, lengths: fn(nnx.merge(graphdef, params), tokens, lengths)
  if mesh is None:
    return one_device(params, tokens, lengths)
  return shd.split_rows(one_device, mesh, params, tokens, lengths)


def top2_gaps(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16,
              devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """Top-1 minus top-2 next-token logit after each text, [len(texts)]: how near the greedy choice
  there is to a tie (a gap below the logits' rounding error can flip between two computations).
  Scored data parallel over `devices` when several (`Scorer`)."""
  rows = [tokenizer.encode(t) for t in texts]
  if not rows or not all(rows):
    raise ValueError('top2_gaps needs non-empty texts')
  scorer, gaps = Scorer(model, devices), []
  for i in range(0, len(rows), batch_size):
    chunk = _fill(rows[i:i + batch_size], batch_size)
    logits = scorer.last_logits(*_padded(chunk, tokenizer.pad_id))
    top = np.partition(logits, -2, axis=-1)[:, -2:]  # the two largest, the largest last
    gaps.append((top[:, 1] - top[:, 0])[:min(batch_size, len(rows) - i)])
  return np.concatenate(gaps)


def choice_logliks(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 16,
                   on_progress=None,
                   devices: Sequence[jax.Device] | None = None) -> list[list[float]]:
  """Per example, the summed log-likelihood of each choice's tokens after its prompt; scored data
  parallel over `devices` when several (`Scorer`)."""
  rows, spans = [], []
  for ex in examples:
    prompt = tokenizer.encode(ex['prompt'])
    for choice in ex['choices']:
      rows.append(prompt + tokenizer.encode(choice))
      spans.append((len(prompt), len(rows[-1])))
  scorer, scores = Scorer(model, devices), []
  for i in range(0, len(rows), batch_size):
    chunk = _fill(rows[i:i + batch_size], batch_size)
    lp = scorer.next_token_logprobs(*_padded(chunk, tokenizer.pad_id))
    for j in range(min(batch_size, len(rows) - i)):
      start, end = spans[i + j]
      scores.append(float(lp[j, start - 1:end - 1].sum()))
    if on_progress:
      on_progress(min(i + batch_size, len(rows)), len(rows))
  out, k = [], 0
  for ex in examples:
    out.append(scores[k:k + len(ex['choices'])])
    k += len(ex['choices'])
  return out


def perplexity(model, tokenizer, texts: Sequence[str], *, seq_len: int = 256,
               batch_size: int = 16, max_rows: int = 0, on_progress=None,
               devices: Sequence[jax.Device] | None = None) -> dict[str, float]:
  """Token-level perplexity of the AR path over `texts` cut into rows of `seq_len` tokens, scored
  data parallel over `devices` when several (`Scorer`).
  Returns {'nll': mean nats per predicted token, 'perplexity', 'tokens'}."""
  rows = _text_rows(tokenizer, texts, seq_len, max_rows)
  scorer, total, count = Scorer(model, devices), 0.0, 0
  per_batch, width = _text_batch_shape(
      rows, batch_size, seq_len, multiple_of=1 if scorer.mesh is None else scorer.mesh.size)
  for i in range(0, len(rows), batch_size):
    chunk = _fill(rows[i:i + batch_size], per_batch)
    tokens, lengths = _padded(chunk, tokenizer.pad_id, width=width)
    lp = scorer.next_token_logprobs(tokens, lengths)
    real = min(batch_size, len(rows) - i)
    total -= float(lp[:real].sum())
    count += int((lengths[:real] - 1).sum())
    if on_progress:
      on_progress(i + real, len(rows))
  nll = total / count
  return {'nll': nll, 'perplexity': float(np.exp(nll)), 'tokens': count}


def _text_batch_shape(rows: list[list[int]], batch_size: int, seq_len: int,
                      multiple_of: int = 1) -> tuple[int, int]:
  """(rows per batch, tokens per row) for scoring `rows`: one shape for every batch (one
  compile), no larger than the rows need: `batch_size` rows, or all of them rounded up to a
  multiple of `multiple_of` (the devices) when that is fewer; the longest row rounded up to 64
  tokens, at most `seq_len`."""
  per_batch = min(batch_size, _round_up(len(rows), multiple_of))
  return per_batch, min(seq_len, _round_up(max(map(len, rows)), 64))


def _text_rows(tokenizer, texts: Sequence[str], seq_len: int, max_rows: int = 0):
  """The texts' tokens cut into rows of at most seq_len, each with a token to predict."""
  rows = []
  for text in texts:
    ids = tokenizer.encode(text)
    rows += [ids[i:i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
  rows = [r for r in rows if len(r) > 1][:max_rows or None]
  if not rows:
    raise ValueError('no text to score')
  return rows


def flare_loss_on_texts(model, tokenizer, texts: Sequence[str],
                        objective: two_stream.ObjectiveConfig, *, seq_len: int = 256,
                        batch_size: int = 16, seed: int = 0, on_progress=None,
                        devices: Sequence[jax.Device] | None = None) -> dict[str, float]:
  """FLARE's training loss on `texts` cut into rows as in `perplexity`, every token after a row's
  first a target: the trainer's metrics (`two_stream.flare_loss`) as one mean over all targets.

  'loss_ar' is the clean stream's NLL per target (`perplexity`'s nll); 'loss_diff' the noisy
  views' term per target (summed over views, as trained); 'loss' their sum; 'n_targets'.
  The noise is drawn from `seed`, per batch, and per device when data parallel over `devices`
  (so loss_diff depends on the device count; the rest does not).
  """
  rows = _text_rows(tokenizer, texts, seq_len)
  graphdef, params = nnx.split(model)
  mesh, params = shd.replicate_over(params, devices)
  devices_used = 1 if mesh is None else mesh.size
  per_batch, width = _text_batch_shape(rows, batch_size, seq_len, multiple_of=devices_used)
  # a multiple of the devices (each scores its slice); rows beyond a batch's texts: empty
  per_batch = _round_up(per_batch, devices_used)
  key, per_device = jax.random.key(seed), []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    tokens, lengths = _padded(chunk + [[tokenizer.pad_id]] * (per_batch - len(chunk)),
                              tokenizer.pad_id, width=width)
    real = np.arange(tokens.shape[1])[None] < lengths[:, None]
    real[len(chunk):] = False
    batch = {'tokens': tokens, 'segment_ids': real.astype(np.int32),
             'positions': np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32),
                                          tokens.shape).copy(),
             'response_mask': real}
    metrics = jax.device_get(_flare_metrics(objective, graphdef, params, batch,
                                            jax.random.fold_in(key, i), mesh=mesh))
    per_device += [{k: float(v[d]) for k, v in metrics.items()} for d in range(devices_used)]
    if on_progress:
      on_progress(i + len(chunk), len(rows))
  out = step_lib.mean_over_batches(per_device)
  return {**out, 'loss': out['loss_ar'] + out['loss_diff']}


@functools.partial(jax.jit, static_argnames=('objective', 'graphdef', 'mesh'))
def _flare_metrics(objective, graphdef, params, batch, rng, *, mesh):
  """flare_loss's metrics of one batch (rows a multiple of the device count), per device: each
  [devices] ([1] without a mesh), the device's slice of the rows with its own noise."""
  def one_device(params, batch, rng):
    if mesh is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(shd.REPLICA_AXIS))
    _, metrics = two_stream.flare_loss(nnx.merge(graphdef, params), batch, rng, objective)
    return {k: v[None] for k, v in metrics.items()}
  if mesh is None:
    return one_device(params, batch, rng)
  rows = P(shd.REPLICA_AXIS)
  return jax.shard_map(one_device, mesh=mesh, in_specs=(P(), rows, P()), out_specs=rows,
                       check_vma=False)(params, batch, rng)


def score_outputs(kind: str, examples: Sequence[dict], outputs: Sequence[str], *,
                  code_timeout_s: float = 10.0,
                  on_progress: Callable[[int, int], None] | None = None) -> list[float]:
  """One score per (example, output). Code runs one program per output, `os.cpu_count()` at a
  time (each is a subprocess: threads only wait), reporting each finished one to `on_progress`."""
  if kind == 'numeric':
    return [scorers.score_numeric(o, ex['answer']) for o, ex in zip(outputs, examples)]
  if kind == 'exact':
    return [scorers.score_exact_line(o, ex['target']) for o, ex in zip(outputs, examples)]
  if kind == 'code':
    def run(pair):
      o, ex = pair
      return scorers.score_code(o, ex['tests'], timeout_s=code_timeout_s,
                                prompt_code=ex['prompt'] if ex.get('prompt_is_code') else None)
    scores = []
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for score in pool.map(run, zip(outputs, examples)):  # in order
        scores.append(score)
        if on_progress:
          on_progress(len(scores), len(outputs))
    return scores
  raise ValueError(f'{kind!r} tasks are not scored from generated text')


def stop_ids(tokenizer, kind: str) -> tuple[int, ...]:
  """The tokenizer's stop ids (EOS and any other end of sequence it lists), plus the newline
  token for single-line answers (exact, numeric) when it is one token."""
  ids = list(tokenizer.stop_ids)
  newline = tokenizer.encode('\n')
  if kind in ('exact', 'numeric') and len(newline) == 1:
    ids.append(newline[0])
  return tuple(ids)


def pass_at_ks(samples: int) -> list[int]:
  """The k reported for `samples` samples per example: 1, 5, 10, 100 where <= samples, and
  samples itself."""
  return sorted({k for k in (1, 5, 10, 100) if k <= samples} | {samples})


def evaluate(model, tokenizer, kind: str, examples: Sequence[dict],
             modes: dict[str, sampler_lib.SamplerConfig] | None = None, *, batch_size: int = 16,
             max_prompt_len: int = 512, code_timeout_s: float = 10.0,
             keep_outputs: bool = False, seq_len: int = 1024,
             objective: two_stream.ObjectiveConfig | None = None,
             devices: Sequence[jax.Device] | None = None, samples: int = 1,
             seed: int = 0) -> dict[str, dict]:
  """Scores a task. Generation kinds: one entry per mode with accuracy and speed (`stop_ids` are
  added to each config's eos_ids; outputs cut at their example's "stop" strings), decoded data
  parallel over `devices` when several, from `seed`. With `samples` > 1 every example is decoded
  that many times (in a sampling mode, each a different draw): accuracy is the mean over all
  samples (pass@1), and 'pass@k' the mean unbiased pass@k over examples (`pass_at_ks`). With
  `keep_outputs`, each mode's 'outputs' (cut at the stop strings) and their 'scores', example-major
  (`samples` per example).
  'choice': one 'loglik' entry. 'text': a 'perplexity' entry (`perplexity` over rows of `seq_len`
  tokens), and with an `objective` a 'flare_loss' entry (`flare_loss_on_texts`, seed 0).
  Decoding modes do not apply to these two, scored likewise."""
  if kind == 'text':
    texts = [ex['text'] for ex in examples]
    ppl = perplexity(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size,
                     on_progress=progress('perplexity'), devices=devices)
    out = {'perplexity': {**ppl, 'n': len(examples)}}
    if objective is not None:
      loss = flare_loss_on_texts(model, tokenizer, texts, objective, seq_len=seq_len,
                                 batch_size=batch_size, on_progress=progress('flare loss'),
                                 devices=devices)
      out['flare_loss'] = {**loss, 'objective': dataclasses.asdict(objective), 'seed': 0}
    return out
  if kind == 'choice':
    logliks = choice_logliks(model, tokenizer, examples, batch_size=batch_size,
                             on_progress=progress('choice'), devices=devices)
    # accuracy_norm: each choice's log-likelihood per UTF-8 byte, so that long choices are not
    # penalised for their length (lm-evaluation-harness's acc_norm)
    correct, correct_norm = [], []
    for ll, ex in zip(logliks, examples):
      per_byte = [x / len(c.encode('utf-8')) for x, c in zip(ll, ex['choices'])]
      correct.append(scorers.best_choice(ll) == ex['label'])
      correct_norm.append(scorers.best_choice(per_byte) == ex['label'])
    return {'loglik': {'accuracy': float(np.mean(correct)),
                       'accuracy_norm': float(np.mean(correct_norm)), 'n': len(examples)}}
  if samples < 1:
    raise ValueError(f'samples must be >= 1, got {samples}')
  results = {}
  sampler = sampler_lib.Sampler(model, devices)  # params replicated once for every mode
  drawn = [ex for ex in examples for _ in range(samples)]  # example-major
  for name, cfg in (modes or {}).items():
    eos = set(cfg.eos_ids) | set(stop_ids(tokenizer, kind))
    cfg = dataclasses.replace(cfg, eos_ids=tuple(sorted(eos)))
    outputs, stats = generate_texts(model, tokenizer, [ex['prompt'] for ex in drawn], cfg,
                                    batch_size=batch_size, max_prompt_len=max_prompt_len,
                                    seed=seed, on_progress=progress(f'{name:>24s}'),
                                    sampler=sampler, stops=[ex.get('stop', ()) for ex in drawn])
    outputs = [stop_strings.cut(o, ex.get('stop', ()))[0] for o, ex in zip(outputs, drawn)]
    scores = score_outputs(kind, drawn, outputs, code_timeout_s=code_timeout_s,
                           on_progress=progress(f'{"running programs":>24s}')
                           if kind == 'code' else None)
    results[name] = {'accuracy': float(np.mean(scores)), 'n': len(examples), **stats.summary()}
    if samples > 1:
      correct = np.reshape(scores, (len(examples), samples)).sum(1).round().astype(int)
      results[name].update(samples=samples, **{
          f'pass@{k}': float(np.mean([scorers.pass_at_k(samples, int(c), k) for c in correct]))
          for k in pass_at_ks(samples)})
    if kind == 'exact':  # graded too: exact lines are rare for small models
      results[name]['line_prefix'] = float(np.mean(
          [scorers.score_line_prefix(o, ex['target']) for o, ex in zip(outputs, drawn)]))
    if keep_outputs:
      results[name].update(outputs=outputs, scores=[float(x) for x in scores])
  return results


def parse_modes(text: str) -> list[str]:
  """'ar;ar_trust:b=4;diffusion_trust:b=4,k=2' (';' between modes) or 'ar,ar_trust' -> mode
  specs."""
  sep = ';' if (';' in text or ':' in text) else ','
  return [m.strip() for m in text.split(sep) if m.strip()]


# Mode spec fields that make a mode sample: spec key -> (SamplerConfig field, type).
_SAMPLING_FIELDS = {'t': ('temperature', float), 'top_p': ('top_p', float),
                    'top_k': ('top_k', int)}
# Mode spec fields that pick Diffusion-Trust's commit rule: spec key -> (rule, its field, type).
_COMMIT_FIELDS = {'threshold': ('threshold', 'threshold', float),
                  'k': ('fixed', 'tokens_per_pass', int), 'factor': ('factor', 'factor', float),
                  'entropy': ('entropy', 'entropy_bound', float)}


def mode_config(spec: str, max_new_tokens: int,
                block_size: int | None = None) -> sampler_lib.SamplerConfig:
  """A SamplerConfig from 'ar' | 'ar_trust[:b=4]' |
  'diffusion_trust[:b=4,threshold=0.9 | k=2 | factor=1.0 | entropy=0.5]' (b: block size, else
  `block_size`, else the sampler's default; one commit rule: threshold, k fixed tokens per pass,
  factor Fast-dLLM's, entropy the EB-sampler's bound in nats; see SamplerConfig), greedy unless
  sampling fields follow: t=0.8 (temperature), top_p=0.95, top_k=50 (e.g. 'ar:t=0.8,top_p=0.95').
  Raises ValueError on an unknown field, a bad value, a commit rule outside diffusion_trust or
  two in one spec."""
  mode, _, rest = spec.partition(':')
  kw = dict(mode=mode, max_new_tokens=max_new_tokens)
  if block_size is not None:
    kw['block_size'] = block_size
  rules = []
  for item in filter(None, rest.split(',')):
    key, _, value = item.partition('=')
    if key == 'b':
      kw['block_size'] = int(value)
    elif key in _COMMIT_FIELDS:
      rule, name, kind = _COMMIT_FIELDS[key]
      kw.update(commit=rule, **{name: kind(value)})
      rules.append(key)
    elif key in _SAMPLING_FIELDS:
      name, kind = _SAMPLING_FIELDS[key]
      kw[name] = kind(value)
    else:
      raise ValueError(f'unknown mode field {key!r} in {spec!r} (known: b, '
                       f'{", ".join(_COMMIT_FIELDS)}, {", ".join(_SAMPLING_FIELDS)})')
  if rules and mode != 'diffusion_trust':
    raise ValueError(f'{spec!r}: {rules[0]}= picks a Diffusion-Trust commit rule; {mode} has none')
  if len(rules) > 1:
    raise ValueError(f'{spec!r}: one commit rule per mode, got {" and ".join(rules)}')
  return sampler_lib.SamplerConfig(**kw)
