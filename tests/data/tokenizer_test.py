"""Tokenizers: byte-level round trip and a checkpoint tokenizer.json built in the test."""
import json

import pytest
from tokenizers import Tokenizer
from tokenizers import models
from tokenizers import pre_tokenizers

from flare_jax.data import tokenizer as tokenizer_lib


def test_byte_tokenizer_round_trips_unicode_and_reserves_specials():
  tok = tokenizer_lib.load_tokenizer('byte')
  text = 'héllo, 世界 ✓'
  ids = tok.encode(text)
  assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
  assert tok.eos_id == 256 and tok.vocab_size == 260 and tok.eos_id in tok.special_ids
  assert tok.decode(ids + [tok.eos_id]) == text


def test_hf_tokenizer_from_a_checkpoint_directory(tmp_path):
  vocab = {'<unk>': 0, '<|endoftext|>': 1, 'hello': 2, 'world': 3}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / 'tokenizer.json'))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|endoftext|>'}))
  hf = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert hf.encode('hello world') == [2, 3]
  assert hf.eos_id == 1 and hf.pad_id == 1 and hf.vocab_size == 4
  assert 'hello' in hf.decode([2, 3])


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='has no tokenizer.json'):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
    tokenizer_lib.load_tokenizer('gpt2')
