"""Tokenizers: a built-in byte-level tokenizer and the checkpoint's own `tokenizer.json` (HF tokenizers).

Both expose encode / decode, eos_id, pad_id, vocab_size and special_ids. No tokenizer ever produces the
model's [MASK] id (the last embedding row by default).
"""
import json
import os
from typing import Protocol


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int
  pad_id: int
  special_ids: frozenset[int]

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes 0..255, then <|endoftext|>=256 (eos), <|pad|>=257, <|im_start|>=258, <|im_end|>=259."""

  SPECIALS = ('<|endoftext|>', '<|pad|>', '<|im_start|>', '<|im_end|>')

  def __init__(self):
    self.eos_id, self.pad_id, self.im_start_id, self.im_end_id = 256, 257, 258, 259
    self.vocab_size = 260
    self.special_ids = frozenset(range(256, 260))

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')


class HFTokenizer:
  """A checkpoint's `tokenizer.json` through the `tokenizers` library."""

  def __init__(self, directory: str):
    from tokenizers import Tokenizer as _Tok  # pylint: disable=g-import-not-at-top
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isfile(path):
      raise ValueError(f'{directory} has no tokenizer.json')
    self._tok = _Tok.from_file(path)
    meta = {}
    for name in ('config.json', 'generation_config.json', 'tokenizer_config.json'):
      p = os.path.join(directory, name)
      if os.path.isfile(p):
        with open(p) as f:
          meta.update({k: v for k, v in json.load(f).items() if v is not None})
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._token_id(meta.get('eos_token'), meta.get('eos_token_id'))
    pad = self._token_id(meta.get('pad_token'), meta.get('pad_token_id'))
    self.pad_id = self.eos_id if pad is None else pad
    self.special_ids = frozenset(
        t.id for t in self._tok.get_added_tokens_decoder().values() if t.special) if hasattr(
            self._tok, 'get_added_tokens_decoder') else frozenset()
    if self.eos_id is None:
      raise ValueError(f'{directory}: cannot find the eos token in its config files')

  def _token_id(self, token, token_id):
    if isinstance(token_id, list):
      token_id = token_id[0] if token_id else None
    if token_id is not None:
      return int(token_id)
    if isinstance(token, dict):
      token = token.get('content')
    return None if token is None else self._tok.token_to_id(token)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
  """'byte' or a directory holding tokenizer.json (a converted checkpoint carries its tokenizer)."""
  if spec == 'byte':
    return ByteTokenizer()
  if os.path.isdir(spec):
    if os.path.isfile(os.path.join(spec, 'tokenizer.json')):
      return HFTokenizer(spec)
    raise ValueError(f'{spec} has no tokenizer.json; pass --tokenizer=byte for the byte tokenizer')
  raise ValueError(f"unknown tokenizer {spec!r}: use 'byte' or a directory with tokenizer.json")
