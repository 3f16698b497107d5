"""launch.sample end to end on a tiny saved checkpoint (`ckpt`, conftest): batched JSONL decoding
into --output (renamed from FILE.partial once complete), and clear errors before any model work."""
import json
import re
import subprocess
import sys

import pytest


def _sample(*args):
  return subprocess.run([sys.executable, '-m', 'launch.sample', *args], capture_output=True,
                        text=True, timeout=300)


def test_batched_prompts_are_written_in_order_then_renamed(ckpt, tmp_path):
  prompts = ['a = ', 'def f(', '1+2=']
  src = tmp_path / 'prompts.jsonl'
  src.write_text('\n'.join(json.dumps({'prompt': p}) for p in prompts[:2]) + '\n\n'
                 + json.dumps({'prompt': prompts[2]}) + '\n')
  out = tmp_path / 'out.jsonl'
  run = _sample(f'--ckpt={ckpt}', f'--prompts={src}', f'--output={out}', '--batch_size=2',
                '--max_new_tokens=4', '--mode=ar_trust', '--gdn_decode_impl=xla',
                '--attn_decode_impl=pallas',  # off GPU: falls back to xla, logged
                '--norm_impl=pallas')  # off GPU: interpret mode
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['prompt'] for r in rows] == prompts
  assert all(r['tokens'] == 4 and 0 <= r['acceptance'] <= 1 for r in rows)
  assert not (tmp_path / 'out.jsonl.partial').exists()
  assert '[2/3]' in run.stderr and '[3/3]' in run.stderr
  assert '12 tokens in ' in run.stderr and 'tokens/s' in run.stderr  # 3 prompts x 4 tokens
  assert 'decode kernel cannot take this call (it needs a GPU' in run.stderr  # the flag reached it


def test_one_prompt_streams_its_text_then_its_totals(ckpt):
  run = _sample(f'--ckpt={ckpt}', '--prompt=1+2=', '--max_new_tokens=5', '--mode=ar_trust',
                '--block_size=2')
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.startswith('1+2=') and run.stdout.endswith('\n')
  assert re.search(r'^5 tokens, \d+ forward passes after the prefill \(\d\.\d\d per token\), '
                   r'\d+ of \d+ drafts accepted, [\d.]+ s', run.stderr, re.MULTILINE), (
                       run.stderr[-2000:])


@pytest.mark.parametrize('record, mode, rc, message', [
    (dict(block_size=2), 'diffusion_trust', 0, "block size 2 (the checkpoint's FLARE training)"),
    (dict(name='ar'), 'ar_trust', 0, 'warning: this checkpoint was never trained with the FLARE'),
    (dict(logit_shift=False), 'ar_trust', 1, 'error: ar_trust decodes with the logit-shift layout'),
])
def test_noisy_modes_follow_the_checkpoints_training(recorded_ckpt, record, mode, rc, message):
  ckpt, _ = recorded_ckpt(**record)
  run = _sample(f'--ckpt={ckpt}', '--prompt=1+2=', '--max_new_tokens=2', f'--mode={mode}')
  assert run.returncode == rc and message in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize('args, message', [
    (['--top_p=0', '--prompt=hi'], 'top_p must be in (0, 1]'),
    (['--prompts=/nonexistent/p.jsonl'], 'no such file'),
    (['--prompt=hi', '--output=/nonexistent/out.jsonl'], 'its directory does not exist'),
    (['--prompt=hi', '--stop_ids=5,x'], '--stop_ids must be token ids'),
    (['--prompt=hi', '--stop_ids=272'], 'are not token ids of this model (vocabulary of 272)'),
    (['--prompt=hi', '--stop=ok', '--stop='], '--stop: a stop string must not be empty'),
    (['--prompt=hi', r'--stop=\q'], r"--stop: '\\q': unknown escape \q"),
    (['--prompt=hi', '--stop_check_every=0'], '--stop_check_every must be >= 1'),
    (['--prompt=hi', '--commit=factor', '--factor=0'], 'factor must be > 0'),
    (['--prompt=hi', '--chat_template_kwargs=[1]'], 'must be a JSON object'),
    (['--prompt=hi', '--chat_template_kwargs={"enable_thinking": false}'],
     'this tokenizer has no chat template'),  # the byte tokenizer's built-in format
])
def test_bad_flags_are_usage_errors(ckpt, args, message):
  run = _sample(f'--ckpt={ckpt}', *args)
  assert run.returncode != 0 and message in run.stderr
  assert 'Traceback' not in run.stderr


@pytest.mark.parametrize('text, message', [
    ('{"prompt": "ok"}\n{"messages": [{"role": "user"}]}\n', ':2: a chat is a list of'),
    ('{"prompt": "a", "messages": []}\n', ':1: expected {"prompt": "..."} or {"messages": [...]}'),
    ('{"prompt": "ok"}\n\n{"prompt": ""}\n', ':3: "prompt" must be a non-empty string'),
    ('{"prompt": "ok"\n', ':1: not JSON'),
    ('{"prompt": "ok", "stop": "\\n"}\n', ':1: "stop" must be a list of non-empty strings'),
    ('\n\n', 'has no prompts'),
])
def test_a_bad_prompts_file_is_one_error_line(ckpt, tmp_path, text, message):
  """The file's content, not the flags, is wrong: its file:line and reason, without flag help."""
  src = tmp_path / 'p.jsonl'
  src.write_text(text)
  run = _sample(f'--ckpt={ckpt}', f'--prompts={src}')
  assert run.returncode == 1 and 'Traceback' not in run.stderr
  assert f'error: {src}{message}' in run.stderr or f'error: {src} {message}' in run.stderr
  assert '--top_k' not in run.stderr  # no usage text


def test_a_directory_that_is_no_checkpoint_is_one_error_line(tmp_path):
  run = _sample(f'--ckpt={tmp_path}', '--prompt=hi')
  assert run.returncode == 1 and 'Traceback' not in run.stderr
  assert f'error: {tmp_path} is not a model checkpoint' in run.stderr


def test_stop_ids_end_every_sequence_at_its_first_token(ckpt, tmp_path):
  """With every id of the model's vocabulary (272) a stop id, each sequence ends after one
  token."""
  src = tmp_path / 'prompts.jsonl'
  src.write_text('\n'.join(json.dumps({'prompt': p}) for p in ('a = ', '1+2=')) + '\n')
  out = tmp_path / 'out.jsonl'
  run = _sample(f'--ckpt={ckpt}', f'--prompts={src}', f'--output={out}', '--max_new_tokens=4',
                '--stop_ids=' + ','.join(map(str, range(272))))
  assert run.returncode == 0, run.stderr[-2000:]
  assert [json.loads(line)['tokens'] for line in out.read_text().splitlines()] == [1, 1]


def _stop_char(text: str) -> str:
  """A printable ASCII character of `text` after its first character (a stop string to try)."""
  chars = [c for c in text[1:] if 33 <= ord(c) < 127 and c != '\\']
  assert chars, f'no printable character to stop at in {text!r}'
  return chars[len(chars) // 2]


def test_stop_strings_cut_batched_and_streamed_completions(ckpt, tmp_path):
  """Each completion with --stop is the completion without it, cut before the stop string's
  first occurrence (finish_reason "stop" where it occurs), and its row ends soon after it; a
  streamed prompt ends there."""
  src = tmp_path / 'prompts.jsonl'
  src.write_text('\n'.join(json.dumps({'prompt': p}) for p in ('a = ', '1+2=', 'x')) + '\n')
  rows = {}
  for name, extra in (('free', []), ('stopped', None)):
    if extra is None:
      stop = _stop_char(rows['free'][0]['completion'])
      extra = [f'--stop={stop}', '--stop=never seen', '--stop_check_every=2']
    out = tmp_path / f'{name}.jsonl'
    run = _sample(f'--ckpt={ckpt}', f'--prompts={src}', f'--output={out}', '--batch_size=2',
                  '--max_new_tokens=16', '--temperature=1', *extra)
    assert run.returncode == 0, run.stderr[-2000:]
    rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
  for free, stopped in zip(rows['free'], rows['stopped']):
    hit = stop in free['completion']
    assert stopped['completion'] == free['completion'].split(stop)[0]
    assert stopped['finish_reason'] == ('stop' if hit else free['finish_reason'])
    assert free['finish_reason'] == ('length' if free['tokens'] == 16 else 'stop')
    # A row whose text holds a stop string ends at the next check; the others run as before.
    assert stopped['tokens'] <= free['tokens'] if hit else stopped['tokens'] == free['tokens']
  assert rows['stopped'][0]['tokens'] < rows['free'][0]['tokens']  # its stop is mid-completion
  # A prompt's own stop strings, beside --stop's (the second prompt's holds the first's stop).
  own = _stop_char(rows['free'][2]['completion'])
  src.write_text(json.dumps({'prompt': 'a = '}) + '\n'
                 + json.dumps({'prompt': '1+2=', 'stop': [stop]}) + '\n'
                 + json.dumps({'prompt': 'x', 'stop': ['never seen', own]}) + '\n')
  out = tmp_path / 'own.jsonl'
  run = _sample(f'--ckpt={ckpt}', f'--prompts={src}', f'--output={out}', '--batch_size=2',
                '--max_new_tokens=16', '--temperature=1')
  assert run.returncode == 0, run.stderr[-2000:]
  own_rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['completion'] for r in own_rows] == [
      rows['free'][0]['completion'], rows['free'][1]['completion'].split(stop)[0],
      rows['free'][2]['completion'].split(own)[0]]
  assert own_rows[2]['stop'] == ['never seen', own]  # echoed with the prompt
  sampled = ('--prompt=a = ', '--max_new_tokens=16', '--temperature=1')  # greedy repeats a token
  free = _sample(f'--ckpt={ckpt}', *sampled)
  assert free.returncode == 0, free.stderr[-2000:]
  completion = free.stdout[len('a = '):-1]
  stop = _stop_char(completion)
  cut = _sample(f'--ckpt={ckpt}', *sampled, f'--stop={stop}')
  assert cut.returncode == 0, cut.stderr[-2000:]
  assert cut.stdout == 'a = ' + completion.split(stop)[0] + '\n'
  assert 'ended at a stop string' in cut.stderr and 'ended at' not in free.stderr


def test_chats_and_chat_prompts_go_through_the_template(ckpt, tmp_path):
  chat = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  src = tmp_path / 'prompts.jsonl'
  src.write_text(json.dumps({'prompt': 'Hi'}) + '\n' + json.dumps({'messages': chat}) + '\n')
  out = tmp_path / 'out.jsonl'
  run = _sample(f'--ckpt={ckpt}', f'--prompts={src}', f'--output={out}', '--max_new_tokens=3',
                '--chat')
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert rows[0]['prompt'] == 'Hi' and rows[1]['messages'] == chat  # echoed as given
  assert all(isinstance(r['completion'], str) and 1 <= r['tokens'] <= 3 for r in rows)
  streamed = _sample(f'--ckpt={ckpt}', '--prompt=Hi', '--chat', '--max_new_tokens=2')
  assert streamed.returncode == 0, streamed.stderr[-2000:]
  assert streamed.stdout.startswith('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')


def test_an_interrupted_output_resumes_to_the_uninterrupted_result(ckpt, tmp_path):
  """--resume continues FILE.partial (a torn last line cut off) and gives the file an
  uninterrupted sampled run writes; without --resume, or with other prompts, FILE.partial is kept
  and the run stops with the reason."""
  src = tmp_path / 'prompts.jsonl'
  src.write_text(''.join(json.dumps({'prompt': p}) + '\n' for p in ('a = ', '1+2=', 'def f(')))
  common = [f'--ckpt={ckpt}', f'--prompts={src}', '--batch_size=1', '--max_new_tokens=3',
            '--temperature=1.0', '--seed=7', '--gdn_decode_impl=xla', '--attn_decode_impl=xla']
  full = tmp_path / 'full.jsonl'
  assert _sample(*common, f'--output={full}').returncode == 0
  rows = full.read_text().splitlines(keepends=True)
  out = tmp_path / 'out.jsonl'
  partial = tmp_path / 'out.jsonl.partial'
  partial.write_text(rows[0] + rows[1][:7])  # one row done, the second torn
  refused = _sample(*common, f'--output={out}')
  assert refused.returncode == 1 and 'pass --resume to continue it' in refused.stderr
  other = tmp_path / 'other.jsonl'
  other.write_text(json.dumps({'prompt': 'x'}) + '\n')
  mismatch = _sample(*common[:1], f'--prompts={other}', *common[2:], f'--output={out}', '--resume')
  assert mismatch.returncode == 1 and 'is not the result of prompt 1' in mismatch.stderr
  assert partial.read_text() == rows[0] + rows[1][:7]  # untouched by the refusals
  resumed = _sample(*common, f'--output={out}', '--resume')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'resuming' in resumed.stderr and '1 of 3 prompts done' in resumed.stderr
  assert out.read_text() == full.read_text() and not partial.exists()
