"""Tokenizers: the byte tokenizer, and a checkpoint tokenizer.json + chat template built here."""
import json
import pickle

import pytest
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from flare_jax.data import packing
from flare_jax.data import tokenizer as tokenizer_lib

CHAT = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi there'},
        {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Sum 2+2?'},
        {'role': 'assistant', 'content': 'It is 4.'}]

# A ChatML template in the style of Qwen's (trim_blocks / lstrip_blocks apply).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Independent expectation of CHAT through ChatML (written out by hand).
CHATML_PROMPT = ('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n'
                 '<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nSum 2+2?<|im_end|>\n'
                 '<|im_start|>assistant\n')


def test_byte_tokenizer_round_trips_unicode_and_reserves_ids():
  tok = tokenizer_lib.load_tokenizer('byte')
  text = 'héllo, 世界 ✓ 🙂\n\ttab'
  ids = tok.encode(text)
  assert ids == list(text.encode('utf-8'))
  assert tok.decode(ids) == text
  assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (260, 256, 257, None)
  assert tok.stop_ids == (256,)
  assert tok.special_ids == {256, 257, 258, 259}


def test_byte_tokenizer_specials_encode_and_decode():
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode('a<|im_start|>b<|im_end|><|endoftext|>')
  assert ids == [97, 258, 98, 259, 256]
  assert tok.decode(ids) == 'a<|im_start|>b<|im_end|><|endoftext|>'
  assert tok.decode([0xe4, 0xb8]) == '\ufffd'  # a cut UTF-8 sequence does not raise
  assert tok.decode([97, 300]) == 'a\ufffd'  # ids past the vocabulary (e.g. [MASK]) are visible


def test_builtin_chat_format():
  prompt, response = tokenizer_lib.ByteTokenizer().render_chat(CHAT)
  assert prompt == CHATML_PROMPT
  assert response == 'It is 4.<|im_end|>'
  with pytest.raises(ValueError, match='must end with an assistant message'):
    tokenizer_lib.builtin_render_chat(CHAT[:-1])
  # Sampling's prompt for the conversation so far is the training prompt's text.
  assert tokenizer_lib.ByteTokenizer().render_prompt(CHAT[:-1]) == CHATML_PROMPT
  assert tokenizer_lib.render_user_prompt(tokenizer_lib.ByteTokenizer(), 'Hi there') == (
      '<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n')
  with pytest.raises(ValueError, match='a chat is a list of'):
    tokenizer_lib.builtin_render_prompt([{'role': 'user'}])


def _write_checkpoint_tokenizer(directory, *, tokenizer_config=None, files=None):
  """A tiny BPE tokenizer trained here, saved as a checkpoint's tokenizer.json (+ configs)."""
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=['<unk>', '<s>', '<|endoftext|>', '<|im_start|>', '<|im_end|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ['hello world', 'the sum of two and two is four', 'Be brief. Hi there, hello!'] * 20
  tok.train_from_iterator(corpus, trainer)
  tok.save(str(directory / 'tokenizer.json'))
  if tokenizer_config is not None:
    (directory / 'tokenizer_config.json').write_text(json.dumps(tokenizer_config))
  for name, content in (files or {}).items():
    (directory / name).write_text(content)
  return tok


def test_hf_tokenizer_ids_round_trip_and_chat_template(tmp_path):
  raw = _write_checkpoint_tokenizer(tmp_path, tokenizer_config={
      'eos_token': '<|im_end|>', 'pad_token': None, 'bos_token': None,
      'chat_template': CHATML_TEMPLATE})
  tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  text = 'hello world, the sum is four!'
  ids = tok.encode(text)
  assert ids == raw.encode(text, add_special_tokens=False).ids and tok.decode(ids) == text
  assert tok.eos_id == raw.token_to_id('<|im_end|>') and tok.pad_id == tok.eos_id
  assert tok.bos_id is None and tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  assert {raw.token_to_id(s) for s in ('<|endoftext|>', '<|im_start|>', '<|im_end|>')} <= (
      tok.special_ids)
  prompt, response = tok.render_chat(CHAT)
  assert prompt == CHATML_PROMPT and response == 'It is 4.<|im_end|>'
  assert tok.render_prompt(CHAT[:-1]) == CHATML_PROMPT  # through the template, as in training
  with pytest.raises(ValueError, match='a chat is a list of'):
    tok.render_prompt([{'role': 'user', 'content': 3}])
  prompt_ids = tok.encode(prompt)  # specials in the rendered text become their single ids
  assert prompt_ids.count(raw.token_to_id('<|im_start|>')) == 5
  assert prompt_ids.count(raw.token_to_id('<|im_end|>')) == 4
  doc = packing.tokenize_example({'messages': CHAT}, tok)  # eos (= <|im_end|>) ends it once
  assert doc['tokens'][-2] != tok.eos_id and doc['tokens'][-1] == tok.eos_id
  assert tok.decode(doc['tokens'][doc['response_mask']]) == 'It is 4.<|im_end|>'
  clone = pickle.loads(pickle.dumps(tok))  # grain worker processes get a pickled copy
  assert clone.render_chat(CHAT) == (prompt, response) and clone.encode(text) == ids


def test_hf_tokenizer_config_fallbacks(tmp_path):
  raw = _write_checkpoint_tokenizer(tmp_path, files={
      'generation_config.json': json.dumps({'eos_token_id': [4, 2], 'bos_token_id': 1}),
      'config.json': json.dumps({'eos_token_id': 2, 'pad_token_id': 0}),
      'chat_template.jinja': CHATML_TEMPLATE})
  assert raw.token_to_id('<|im_end|>') == 4
  tok = tokenizer_lib.HFTokenizer.from_dir(str(tmp_path))
  # generation_config before config.json; the first of a list; pad from config.json.
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (4, 1, 0)
  assert tok.stop_ids == (2, 4)  # every listed eos id ends a generation
  assert tok.render_chat(CHAT)[0] == CHATML_PROMPT  # the template came from chat_template.jinja


def test_hf_tokenizer_named_templates_and_builtin_fallback(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'b').mkdir()
  _write_checkpoint_tokenizer(tmp_path / 'a', tokenizer_config={
      'eos_token': {'content': '<|endoftext|>'},
      'chat_template': [{'name': 'tool_use', 'template': 'x'},
                        {'name': 'default', 'template': CHATML_TEMPLATE}]})
  _write_checkpoint_tokenizer(tmp_path / 'b', tokenizer_config={'eos_token': '<|endoftext|>'})
  for sub in ('a', 'b'):
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / sub))
    assert tok.render_chat(CHAT) == (CHATML_PROMPT, 'It is 4.<|im_end|>')


def test_chat_template_that_rewrites_history_is_an_error(tmp_path):
  # Renders the final assistant turn with a different header than the generation prompt.
  bad = CHATML_TEMPLATE.replace("{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}",
                                "{% if add_generation_prompt %}{{ '<|im_start|>bot\\n' }}")
  _write_checkpoint_tokenizer(tmp_path, tokenizer_config={'eos_token': '<|im_end|>',
                                                          'chat_template': bad})
  tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match='does not start with the rendered prompt'):
    tok.render_chat(CHAT)
  with pytest.raises(ValueError, match='must end with an assistant message'):
    tok.render_chat(CHAT[:2])


def test_a_template_that_raises_is_a_value_error(tmp_path):
  refuses = ("{% if messages[0]['role'] != 'system' %}"
             "{{ raise_exception('a system turn must come first') }}{% endif %}" + CHATML_TEMPLATE)
  _write_checkpoint_tokenizer(tmp_path, tokenizer_config={'eos_token': '<|im_end|>',
                                                          'chat_template': refuses})
  tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert tok.render_prompt(CHAT[:-1]) == CHATML_PROMPT
  with pytest.raises(ValueError, match='the chat template failed.*a system turn must come first'):
    tok.render_prompt(CHAT[1:2])


def test_missing_files_and_tokens_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='has no tokenizer.json'):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match='has no tokenizer.json'):
    tokenizer_lib.HFTokenizer.from_dir(str(tmp_path))
  with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
    tokenizer_lib.load_tokenizer('gpt2')
  _write_checkpoint_tokenizer(tmp_path)
  with pytest.raises(ValueError, match='no eos token'):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<nope>'}))
  with pytest.raises(ValueError, match="eos_token '<nope>' is not in tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  (tmp_path / 'tokenizer_config.json').write_text('{oops')
  with pytest.raises(ValueError, match='is not valid JSON'):
    tokenizer_lib.load_tokenizer(str(tmp_path))


def test_checkpoint_tokenizer_prefers_the_spec_then_the_checkpoints_file_then_bytes(tmp_path):
  with_file, without = tmp_path / 'hf', tmp_path / 'scratch'
  with_file.mkdir()
  without.mkdir()
  _write_checkpoint_tokenizer(with_file, tokenizer_config={'eos_token': '<|im_end|>'})
  assert isinstance(tokenizer_lib.checkpoint_tokenizer(str(with_file)), tokenizer_lib.HFTokenizer)
  assert isinstance(tokenizer_lib.checkpoint_tokenizer(str(without)), tokenizer_lib.ByteTokenizer)
  assert isinstance(tokenizer_lib.checkpoint_tokenizer(str(with_file), 'byte'),
                    tokenizer_lib.ByteTokenizer)
  with pytest.raises(ValueError, match='no tokenizer.json'):
    tokenizer_lib.checkpoint_tokenizer(str(with_file), str(without))


def test_chat_template_kwargs_reach_the_template(tmp_path):
  """chat_template_kwargs as transformers' apply_chat_template kwargs: a Qwen-style
  enable_thinking switch, applied to prompts and kept by pickled copies (grain workers); the
  tokenizer loaded without them is unchanged."""
  thinking = CHATML_TEMPLATE.replace(
      "{{ '<|im_start|>assistant\\n' }}{% endif %}",
      "{{ '<|im_start|>assistant\\n' }}{% if enable_thinking is defined and not enable_thinking %}"
      "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}")
  _write_checkpoint_tokenizer(tmp_path, tokenizer_config={'eos_token': '<|im_end|>',
                                                          'chat_template': thinking})
  plain = tokenizer_lib.load_tokenizer(str(tmp_path))
  off = tokenizer_lib.load_tokenizer(str(tmp_path), '{"enable_thinking": false}')
  assert plain.render_prompt(CHAT[:-1]) == CHATML_PROMPT
  assert off.render_prompt(CHAT[:-1]) == CHATML_PROMPT + '<think>\n\n</think>\n\n'
  assert pickle.loads(pickle.dumps(off)).render_prompt(CHAT[:-1]).endswith('</think>\n\n')
  assert plain.render_prompt(CHAT[:-1]) == CHATML_PROMPT  # `off` is a copy


@pytest.mark.parametrize('text, message', [
    ('{"enable_thinking": ', 'not JSON'), ('[1]', 'must be a JSON object'),
    ('{"messages": []}', "may not set \\['messages'\\]")])
def test_bad_chat_template_kwargs_are_value_errors(text, message):
  with pytest.raises(ValueError, match=message):
    tokenizer_lib.parse_template_kwargs(text)


def test_chat_template_kwargs_need_a_chat_template():
  with pytest.raises(ValueError, match='has no chat template'):
    tokenizer_lib.load_tokenizer('byte', '{"enable_thinking": false}')
  assert tokenizer_lib.parse_template_kwargs('  ') == {}


@pytest.mark.parametrize('which', ['byte', 'hf'])
def test_incremental_decoding_never_splits_a_character(tmp_path, which):
  """Pieces of one id at a time: multi-byte characters arrive over several ids in both vocabularies
  (bytes, and the BPE's byte-level alphabet: none of these characters is in its merges)."""
  if which == 'byte':
    tok = tokenizer_lib.ByteTokenizer()
  else:
    _write_checkpoint_tokenizer(tmp_path, tokenizer_config={'eos_token': '<|im_end|>'})
    tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  text = 'héllo wörld, 2+2 ≈ 4 🙂!'
  ids = tok.encode(text)
  assert len(ids) > len(text)  # some character spans several ids
  decoder = tokenizer_lib.IncrementalDecoder(tok)
  shown = [decoder.add([i]) for i in ids]
  assert ''.join(shown) == text and decoder.flush() == ''
  assert not any('\ufffd' in piece for piece in shown)
  assert shown[-1] == '!'


def test_incremental_decoding_flushes_bytes_that_never_form_a_character():
  tok = tokenizer_lib.ByteTokenizer()
  decoder = tokenizer_lib.IncrementalDecoder(tok)
  assert decoder.add([ord('a'), 0xE2]) == 'a'  # the first byte of a 3-byte character: held back
  assert decoder.add([0x89]) == ''
  assert decoder.flush() == '\ufffd'  # the text ends before the character does
  assert decoder.add([ord('b')]) == 'b'
