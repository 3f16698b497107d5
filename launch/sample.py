"""Decodes prompts with a converted or trained checkpoint: AR, AR-Trust or Diffusion-Trust.

python -m launch.sample --ckpt=DIR --mode=ar_trust --prompt="def add(a, b):"
python -m launch.sample --ckpt=DIR --mode=diffusion_trust --prompts=prompts.jsonl --output=out.jsonl

--prompts is JSONL with a "prompt" text or a "messages" chat (a list of {"role", "content"} turns)
per line; chats, and with --chat every prompt as a user turn, go through the checkpoint's chat
template (its generation prompt), and the sequence ends at any eos id the checkpoint lists (Qwen:
end of turn or of text; the completion leaves that token out). --stop cuts a completion before
the first of its strings (matched on the decoded text, so a stop string may span tokens); a
--prompts line may add its own, "stop": ["...", ...].

One prompt streams its text as it is committed, and stops decoding at a stop string. Several are
decoded in jitted batches (prompt widths padded to a multiple of 64: one compile per bucket; with
stop strings the rows are checked every --stop_check_every iterations, and a row ends at the first
check after its text holds one; a batch ends when all its rows have), with a progress line per
batch on stderr
and one JSON line per prompt: the prompt, its completion, tokens (generated, EOS included),
forward passes, AR-Trust's acceptance and finish_reason: "stop" (an end id or a stop string) or
"length" (--max_new_tokens). --output is written as FILE.partial and renamed to FILE once every
prompt is decoded, so FILE is never half-written and a failed run leaves the finished prompts in
FILE.partial; the same command with --resume continues from them (a run without --resume will not
overwrite a FILE.partial). Flags, prompts and the output directory are checked before the model
loads.
The tokenizer is the checkpoint's tokenizer.json, else the built-in byte tokenizer.
"""
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from flare_jax.checkpoint import model_io
from flare_jax.data import tokenizer as tokenizer_lib
from flare_jax.sampling import sampler as sampler_lib
from flare_jax.sampling import stop_strings
from flare_jax.sampling import training_record
from launch import runtime

_CKPT = flags.DEFINE_string('ckpt', None, 'Model checkpoint directory.', required=True)
_MODE = flags.DEFINE_enum('mode', 'ar', list(sampler_lib.MODES), 'Decoding mode.')
_PROMPT = flags.DEFINE_string('prompt', None, 'One prompt (streams its output).')
_PROMPTS = flags.DEFINE_string('prompts', None,
                               'JSONL file of {"prompt": ...} or {"messages": [...]} lines.')
_CHAT = flags.DEFINE_bool('chat', False, 'Send each prompt text as a user turn through the '
                          "checkpoint's chat template (\"messages\" lines always go through it).")
_OUTPUT = flags.DEFINE_string('output', None, 'JSONL results (default: stdout).')
_RESUME = flags.DEFINE_bool('resume', False, 'Continue the FILE.partial an interrupted --output '
                            'run left: its rows must be the first prompts, in order.')
_TEMPLATE_KWARGS = flags.DEFINE_string(
    'chat_template_kwargs', '', 'Variables for the chat template (a JSON object), e.g. '
    '\'{"enable_thinking": false}\' (as transformers\' apply_chat_template kwargs).')
_TOKENIZER = flags.DEFINE_string('tokenizer', '', "'byte' or a directory "
                                 "(default: the checkpoint's).")
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Tokens to generate per prompt.')
_STOP_IDS = flags.DEFINE_list(
    'stop_ids', [], 'More token ids that end a sequence (comma-separated), beside the '
    "tokenizer's end ids (eos and every eos_token_id its generation_config.json or config.json "
    'lists).')
_STOP = flags.DEFINE_multi_string(
    'stop', [], 'Text that ends a completion, which is cut before it (repeatable: --stop=A '
    r"--stop=B). \n, \t, \r and \\ are read as escapes, so --stop='\n\n' is a blank line.")
_STOP_CHECK_EVERY = flags.DEFINE_integer(
    'stop_check_every', 16, 'With stop strings, batched decoding checks each row\'s text every '
    'this many iterations and ends the rows that hold one (fewer: rows end sooner after their '
    'stop string, for more host round trips).')
_BLOCK = flags.DEFINE_integer('block_size', None, 'AR-Trust / Diffusion-Trust block size '
                              "(default: the checkpoint's FLARE training's, else 4).")
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k filter (0 = off).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus filter (1 = off).')
_COMMIT = flags.DEFINE_enum(
    'commit', 'threshold', list(sampler_lib.COMMIT_RULES), 'Diffusion-Trust commit rule, each '
    'committing at least the most certain slot per pass: threshold (confidence >= --threshold), '
    "fixed (--tokens_per_pass), factor (Fast-dLLM's, --factor), entropy (EB-sampler's, "
    '--entropy_bound).')
_THRESHOLD = flags.DEFINE_float('threshold', 0.9, 'Diffusion-Trust confidence threshold.')
_PER_PASS = flags.DEFINE_integer('tokens_per_pass', 2, "Tokens per pass for --commit=fixed.")
_FACTOR = flags.DEFINE_float('factor', 1.0, 'For --commit=factor: the n most confident slots, n '
                             'the largest with (i + 1)(1 - c_i) < factor for the i-th highest '
                             'confidences c_i up to n (larger: more per pass).')
_ENTROPY_BOUND = flags.DEFINE_float('entropy_bound', 0.5, 'For --commit=entropy: slots by rising '
                                    'entropy while the entropy before each is <= this (nats).')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Prompts per jitted batch.')
_DATA_PARALLEL = flags.DEFINE_bool('data_parallel', True, "Split each batch over this process's "
                                   'devices (params replicated on each; not for one --prompt).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Compute dtype.')
_DECODE_IMPL = flags.DEFINE_enum(
    'gdn_decode_impl', 'auto', ['auto', 'xla', 'pallas'],
    "GDN cached passes: conv, gates and recurrence in one kernel or in XLA "
    "(ModelConfig.gdn_decode_impl; 'auto': pallas on GPU).")
_ATTN_DECODE_IMPL = flags.DEFINE_enum(
    'attn_decode_impl', 'auto', ['auto', 'xla', 'pallas'],
    "Attention cached calls: the decode kernel or XLA (ModelConfig.attn_decode_impl; 'auto': "
    'pallas on GPU).')
_NORM_IMPL = flags.DEFINE_enum(
    'norm_impl', 'auto', ['auto', 'xla', 'pallas'],
    "Cached passes' residual adds with their RMSNorms: one kernel each or XLA "
    "(ModelConfig.norm_impl; 'auto': xla).")


def _read_prompts() -> list[dict]:
  """The prompts as given: {'prompt': str} or {'messages': [turns]} each.

  Raises:
    app.UsageError: not exactly one of --prompt and --prompts, or no such --prompts file.
    ValueError: a --prompts line that is not a prompt (its file:line in the message).
  """
  if (_PROMPT.value is None) == (_PROMPTS.value is None):
    raise app.UsageError('pass exactly one of --prompt or --prompts')
  if _PROMPT.value is not None:
    return [{'prompt': _PROMPT.value}]
  prompts = []
  if not os.path.isfile(_PROMPTS.value):
    raise app.UsageError(f'--prompts={_PROMPTS.value}: no such file')
  with open(_PROMPTS.value) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{_PROMPTS.value}:{n}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{where}: not JSON ({e})') from e
      if not isinstance(row, dict) or ('prompt' in row) == ('messages' in row):
        raise ValueError(f'{where}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
      stop = {}
      if 'stop' in row:
        try:
          stop_strings.from_json(row['stop'])
        except ValueError as e:
          raise ValueError(f'{where}: {e}') from e
        stop = {'stop': row['stop']}
      if 'prompt' in row:
        if not isinstance(row['prompt'], str) or not row['prompt']:
          raise ValueError(f'{where}: "prompt" must be a non-empty string')
        prompts.append({'prompt': row['prompt'], **stop})
        continue
      try:
        tokenizer_lib.check_turns(row['messages'])
      except ValueError as e:
        raise ValueError(f'{where}: {e}') from e
      if not row['messages']:
        raise ValueError(f'{where}: "messages" is empty')
      prompts.append({'messages': row['messages'], **stop})
  if not prompts:
    raise ValueError(f'{_PROMPTS.value} has no prompts')
  return prompts


def _prompt_text(item: dict, tokenizer) -> str:
  """The text a prompt item is decoded from: a chat (or, with --chat, a text as a user turn)
  through the tokenizer's chat template, else the text itself."""
  if 'messages' in item:
    return tokenizer.render_prompt(item['messages'])
  if _CHAT.value:
    return tokenizer_lib.render_user_prompt(tokenizer, item['prompt'])
  return item['prompt']


def _sampler_config(record: dict | None) -> sampler_lib.SamplerConfig:
  """The decoding flags as a SamplerConfig (its checks as usage errors); EOS ids come later.
  Without --block_size, the block size of the checkpoint's training `record`."""
  block_size = _BLOCK.value
  if block_size is None:
    block_size = training_record.default_block_size(record)
  try:
    return sampler_lib.SamplerConfig(
        mode=_MODE.value, block_size=block_size, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        commit=_COMMIT.value, threshold=_THRESHOLD.value, tokens_per_pass=_PER_PASS.value,
        factor=_FACTOR.value, entropy_bound=_ENTROPY_BOUND.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def _stop_ids() -> set[int]:
  """--stop_ids as ints (usage errors for anything else)."""
  try:
    ids = {int(i) for i in _STOP_IDS.value}
  except ValueError as e:
    raise app.UsageError(f'--stop_ids must be token ids, got {_STOP_IDS.value}') from e
  if any(i < 0 for i in ids):
    raise app.UsageError(f'--stop_ids must be >= 0, got {sorted(ids)}')
  return ids


def _stop_strings() -> tuple[str, ...]:
  """--stop with its escapes read (usage errors for an unknown escape or an empty string)."""
  try:
    return stop_strings.check([stop_strings.unescape(t) for t in _STOP.value])
  except ValueError as e:
    raise app.UsageError(f'--stop: {e}') from e


def _load(ckpt: str):
  """(model, tokenizer) of the checkpoint; exits with the reason when it cannot be read."""
  try:
    pick = lambda flag: None if flag.value == 'auto' else flag.value
    model = model_io.load_model(ckpt, dtype=_DTYPE.value, gdn_decode_impl=pick(_DECODE_IMPL),
                                attn_decode_impl=pick(_ATTN_DECODE_IMPL),
                                norm_impl=pick(_NORM_IMPL))
    return model, tokenizer_lib.checkpoint_tokenizer(ckpt, _TOKENIZER.value,
                                                     _TEMPLATE_KWARGS.value)
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  record = model_io.load_training(_CKPT.value)
  cfg = _sampler_config(record)
  try:
    warning = training_record.check_mode(cfg.mode, record)
  except ValueError as e:
    sys.exit(f'error: {e}')
  if warning:
    print(f'warning: {warning}', file=sys.stderr)
  if cfg.mode in training_record.NOISY_MODES and _BLOCK.value is None:
    source = ("the checkpoint's FLARE training" if training_record.trained_block_size(record)
              else "the sampler's default: the checkpoint records none")
    print(f'block size {cfg.block_size} ({source})', file=sys.stderr)
  if _BATCH.value < 1:
    raise app.UsageError(f'--batch_size must be >= 1, got {_BATCH.value}')
  if _STOP_CHECK_EVERY.value < 1:
    raise app.UsageError(f'--stop_check_every must be >= 1, got {_STOP_CHECK_EVERY.value}')
  try:
    prompts = _read_prompts()
  except ValueError as e:  # the file's content: one line, no flag help
    sys.exit(f'error: {e}')
  extra, stops = _stop_ids(), _stop_strings()
  if _OUTPUT.value and not os.path.isdir(os.path.dirname(os.path.abspath(_OUTPUT.value))):
    raise app.UsageError(f'--output={_OUTPUT.value}: its directory does not exist')
  try:
    tokenizer_lib.parse_template_kwargs(_TEMPLATE_KWARGS.value)
  except ValueError as e:
    raise app.UsageError(f'--chat_template_kwargs: {e}') from e
  if _RESUME.value and not _OUTPUT.value:
    raise app.UsageError('--resume continues an --output file: pass --output')
  try:
    start = _finished_rows(prompts) if _OUTPUT.value else 0
  except ValueError as e:
    sys.exit(f'error: {e}')
  model, tokenizer = _load(_CKPT.value)
  if bad := sorted(i for i in extra if i >= model.cfg.vocab_size):
    raise app.UsageError(f'--stop_ids {bad} are not token ids of this model '
                         f'(vocabulary of {model.cfg.vocab_size})')
  eos = set(tokenizer.stop_ids) | extra | (
      {model.cfg.eos_token_id} if model.cfg.eos_token_id is not None else set())
  cfg = dataclasses.replace(cfg, eos_ids=tuple(sorted(eos)))
  several = len(prompts) > 1 or bool(_OUTPUT.value)
  sampler = sampler_lib.Sampler(
      model, jax.local_devices() if _DATA_PARALLEL.value and several else None)
  rng = jax.random.key(_SEED.value)
  try:
    texts = [_prompt_text(item, tokenizer) for item in prompts]
  except ValueError as e:  # the chat template refused a chat
    sys.exit(f'error: {e}')
  encoded = [tokenizer.encode(t) for t in texts]
  if empty := [n for n, ids in enumerate(encoded, 1) if not ids]:
    sys.exit(f'error: prompt(s) {empty} encode to no tokens')
  if len(prompts) == 1 and not _OUTPUT.value:
    _stream_one(sampler, cfg, rng, tokenizer, stops + tuple(prompts[0].get('stop', ())),
                texts[0], encoded[0])
    return
  if not _OUTPUT.value:
    _decode_batches(sampler, cfg, rng, tokenizer, stops, prompts, encoded, sys.stdout)
    return
  partial = _OUTPUT.value + '.partial'
  with open(partial, 'a' if start else 'w') as out:
    _decode_batches(sampler, cfg, rng, tokenizer, stops, prompts, encoded, out, start)
  os.replace(partial, _OUTPUT.value)
  print(f'wrote {len(prompts)} results to {_OUTPUT.value}', file=sys.stderr)


def _stream_one(sampler, cfg, rng, tokenizer, stops, text: str, ids: list[int]) -> None:
  """Prints the prompt, then its completion as it is committed (without its EOS token; decoding
  ends at the first stop string); the row's totals on stderr."""
  print(text, end='', flush=True)
  pieces, text_of = sampler.stream(ids, cfg, rng), tokenizer_lib.IncrementalDecoder(tokenizer)
  shown = stop_strings.StopStringStream(stops)
  t0 = time.perf_counter()
  while True:
    try:
      piece = pieces.send(True if shown.stopped else None)
    except StopIteration as finished:
      stats = finished.value
      break
    piece, _ = sampler_lib.completion_ids(piece, cfg.eos_ids)  # only a last piece ends in EOS
    print(shown.add(text_of.add(piece)), end='', flush=True)
  print(shown.add(text_of.flush()) + shown.flush(), flush=True)
  secs = time.perf_counter() - t0
  passes = stats.forward_passes - 1  # after the prefill, as launch.eval counts them
  line = (f'{stats.tokens} tokens, {passes} forward passes after the prefill '
          f'({passes / max(stats.tokens, 1):.2f} per token)')
  if cfg.mode == 'ar_trust':
    line += f', {stats.accepted} of {stats.drafted} drafts accepted'
  if shown.stopped:
    line += ', ended at a stop string'
  print(f'{line}, {secs:.1f} s (compiles included)', file=sys.stderr)


def _finished_rows(prompts: list[dict]) -> int:
  """How many prompts --output's FILE.partial already holds (0 without one). With --resume, its
  complete rows must be the first prompts in order, a multiple of --batch_size unless all
  (so each batch meets the seed it would have met); a torn last line is cut off.

  Raises:
    ValueError: a FILE.partial without --resume, or rows that do not continue these prompts.
  """
  partial = _OUTPUT.value + '.partial'
  if not os.path.exists(partial):
    return 0
  if not _RESUME.value:
    raise ValueError(f'{partial} exists (an interrupted run\'s finished prompts): pass --resume '
                     'to continue it, or remove it')
  rows, keep = 0, 0
  with open(partial, 'rb') as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        break  # a line cut short by the interruption
      if rows >= len(prompts) or any(row.get(k) != v for k, v in prompts[rows].items()):
        raise ValueError(f'{partial}:{rows + 1} is not the result of prompt {rows + 1} of '
                         f'{_PROMPTS.value}: resume with the interrupted run\'s prompts')
      rows, keep = rows + 1, keep + len(line)
  if rows % _BATCH.value and rows < len(prompts):
    raise ValueError(f'{partial} holds {rows} rows, not a multiple of --batch_size='
                     f'{_BATCH.value}: resume with the interrupted run\'s --batch_size')
  with open(partial, 'r+b') as f:
    f.truncate(keep)
  print(f'resuming {partial}: {rows} of {len(prompts)} prompts done', file=sys.stderr)
  return rows


def _decode_batches(sampler, cfg, rng, tokenizer, stops, prompts, encoded, out, start: int = 0):
  """Decodes prompts[start:] in batches of --batch_size, one JSON line per prompt into `out`
  (batch i meets the seed fold_in(rng, i), wherever the run starts); completions are cut at the
  first of `stops` and their prompt's own stop strings."""
  done, tokens = start, 0
  seconds = 0.0
  for i in range(start, len(prompts), _BATCH.value):
    chunk = encoded[i:i + _BATCH.value]
    width = -(-max(map(len, chunk)) // 64) * 64
    batch = np.full((_BATCH.value, width), tokenizer.pad_id, np.int32)
    lengths = np.ones((_BATCH.value,), np.int32)  # filler rows: one token, discarded
    for r, ids in enumerate(chunk):
      batch[r, :len(ids)] = ids
      lengths[r] = len(ids)
    row_stops = [stops + tuple(p.get('stop', ())) for p in prompts[i:i + len(chunk)]]
    # With stop strings a row ends soon after its first one (filler rows at once).
    stop_test = stop_strings.stop_test(tokenizer.decode, row_stops) if any(row_stops) else None
    t0 = time.perf_counter()
    res = jax.device_get(sampler.generate(batch, lengths, cfg, jax.random.fold_in(rng, i),
                                          should_stop=stop_test,
                                          check_every=_STOP_CHECK_EVERY.value))
    secs = time.perf_counter() - t0
    for r, ids in enumerate(chunk):
      n = int(res.num_tokens[r])
      kept, ended = sampler_lib.completion_ids(res.tokens[r, :n], cfg.eos_ids)
      completion, hit = stop_strings.cut(tokenizer.decode(kept), row_stops[r])
      out.write(json.dumps({
          **prompts[i + r], 'completion': completion,
          'tokens': n, 'forward_passes': int(res.n_forward[r]),
          'acceptance': (float(res.n_accepted[r]) / max(int(res.n_drafted[r]), 1)
                         if cfg.mode == 'ar_trust' else None),
          'finish_reason': 'stop' if ended or hit else 'length'}) + '\n')
    out.flush()
    done += len(chunk)
    tokens += int(res.num_tokens[:len(chunk)].sum())
    seconds += secs
    print(f'[{done}/{len(prompts)}] batch of {len(chunk)} in {secs:.1f} s', file=sys.stderr)
  print(f'{tokens} tokens in {seconds:.1f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s '
        '(compiles included)', file=sys.stderr)


if __name__ == '__main__':
  runtime.run(main)
