"""Tokenizers: a built-in byte-level one and a checkpoint's own `tokenizer.json` (HF tokenizers).

Both follow the `Tokenizer` protocol. No tokenizer ever produces the model's [MASK] id (the last row
of the embedding table, which is larger than any tokenizer vocabulary used here).
"""
import copy
import json
import os
import re
from typing import Any, Mapping, Protocol, Sequence

# The built-in chat format (ChatML-like), used when a checkpoint has no chat template.
IM_START, IM_END = '<|im_start|>', '<|im_end|>'


class Tokenizer(Protocol):
  """What the data pipeline and the sampler need from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    ...

  @property
  def eos_id(self) -> int:
    ...

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end a generation: eos_id and any other end-of-sequence id the checkpoint
    lists (a chat model's end of turn), ascending."""
    ...

  @property
  def pad_id(self) -> int:
    ...

  @property
  def bos_id(self) -> int | None:
    ...

  @property
  def special_ids(self) -> frozenset[int]:
    ...

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...

  def render_chat(self, messages: list[dict]) -> tuple[str, str]:
    ...

  def render_prompt(self, messages: list[dict]) -> str:
    ...


def builtin_render_prompt(messages: list[dict]) -> str:
  """The built-in format's generation prompt for `messages` (a conversation awaiting the
  assistant's turn): every turn, then the header `<|im_start|>assistant\\n`.

  Raises:
    ValueError: a message that is not a {'role': str, 'content': str} turn.
  """
  check_turns(messages)
  turns = ''.join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
  return turns + f'{IM_START}assistant\n'


def builtin_render_chat(messages: list[dict]) -> tuple[str, str]:
  """Renders chat turns in the built-in format, `<|im_start|>{role}\\n{content}<|im_end|>\\n` each.

  Args:
    messages: [{'role': str, 'content': str}, ...], the last one an assistant turn.

  Returns:
    (prompt, response): the prompt is every earlier turn plus the last turn's header
    `<|im_start|>assistant\\n`; the response is the last turn's content plus `<|im_end|>`.

  Raises:
    ValueError: no messages, or the last one is not an assistant turn.
  """
  _check_chat(messages)
  return builtin_render_prompt(messages[:-1]), messages[-1]['content'] + IM_END


def _check_chat(messages: list[dict]) -> None:
  if not messages or messages[-1].get('role') != 'assistant':
    raise ValueError('a chat example must end with an assistant message; got roles '
                     f"{[m.get('role') for m in messages]}")


def render_user_prompt(tokenizer: 'Tokenizer', text: str) -> str:
  """`text` as a user turn through the tokenizer's chat template: the generation prompt an
  instruct model answers."""
  return tokenizer.render_prompt([{'role': 'user', 'content': text}])


def parse_template_kwargs(text: str) -> dict[str, Any]:
  """A chat_template_kwargs flag or config value: '' (none) or a JSON object of the variables a
  chat template reads beside the messages, e.g. '{"enable_thinking": false}'.

  Raises:
    ValueError: not a JSON object, or a key the renderer sets itself.
  """
  if not text.strip():
    return {}
  try:
    kwargs = json.loads(text)
  except ValueError as e:
    raise ValueError(f'chat_template_kwargs is not JSON ({e}): {text!r}') from e
  if not isinstance(kwargs, dict):
    raise ValueError(f'chat_template_kwargs must be a JSON object, got {text!r}')
  if taken := sorted(set(kwargs) & {'messages', 'add_generation_prompt'}):
    raise ValueError(f'chat_template_kwargs may not set {taken}: the renderer sets them')
  return kwargs


def with_template_kwargs(tokenizer: 'Tokenizer', kwargs: Mapping[str, Any]) -> 'Tokenizer':
  """The tokenizer rendering chats with these template variables ({}: the tokenizer itself).

  Raises:
    ValueError: variables for a tokenizer without a chat template (the built-in format takes
      none).
  """
  if not kwargs:
    return tokenizer
  if getattr(tokenizer, 'chat_template', None) is None:
    raise ValueError(f'chat_template_kwargs {dict(kwargs)} given, but this tokenizer has no chat '
                     'template (the built-in chat format takes no variables)')
  return tokenizer.with_template_kwargs(kwargs)


def check_turns(messages: list[dict]) -> None:
  """Raises ValueError unless `messages` is a list of {"role": str, "content": str} turns."""
  if not isinstance(messages, list) or not all(
      isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)
      for m in messages):
    raise ValueError('a chat is a list of {"role": str, "content": str} turns; got '
                     f'{str(messages)[:200]}')


class IncrementalDecoder:
  """The text of a growing id sequence, as new pieces: for streaming generated tokens.

  Decoding each piece alone would show a character whose bytes span two pieces (UTF-8 through a
  byte-level vocabulary) as two U+FFFD. Here every `add` decodes all ids so far and returns the text
  not yet returned, holding back trailing U+FFFD (a character whose last bytes are still to come);
  `flush` returns whatever is held back at the end.
  """

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._ids: list[int] = []
    self._shown = 0  # characters of the decoded text already returned

  def add(self, ids: Sequence[int]) -> str:
    self._ids.extend(int(i) for i in ids)
    return self._take(self._tokenizer.decode(self._ids).rstrip('\ufffd'))

  def flush(self) -> str:
    return self._take(self._tokenizer.decode(self._ids))

  def _take(self, text: str) -> str:
    new = text[self._shown:]
    self._shown = max(self._shown, len(text))
    return new


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; then <|endoftext|>=256 (eos), <|pad|>=257, <|im_start|>=258,
  <|im_end|>=259. `encode` maps those four strings in the text to their ids (as HF tokenizers do for
  added special tokens); `decode` renders them back: encode(decode(ids)) == ids for valid UTF-8."""

  SPECIALS = ('<|endoftext|>', '<|pad|>', IM_START, IM_END)

  def __init__(self):
    self._special_to_id = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
    self._split = re.compile('(' + '|'.join(re.escape(s) for s in self.SPECIALS) + ')')

  vocab_size = property(lambda self: 260)
  eos_id = property(lambda self: 256)
  stop_ids = property(lambda self: (self.eos_id,))
  pad_id = property(lambda self: 257)
  bos_id = property(lambda self: None)
  special_ids = property(lambda self: frozenset(range(256, 260)))

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self._split.split(text):
      special = self._special_to_id.get(piece)
      ids.extend([special] if special is not None else piece.encode('utf-8'))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes are decoded as UTF-8 (invalid sequences become U+FFFD), specials as their strings, ids
    outside the vocabulary as U+FFFD."""
    out, run = [], bytearray()
    for i in (int(i) for i in ids):
      if 0 <= i < 256:
        run.append(i)
        continue
      out.append(run.decode('utf-8', errors='replace'))
      run = bytearray()
      out.append(self.SPECIALS[i - 256] if 256 <= i < 260 else '\ufffd')
    out.append(run.decode('utf-8', errors='replace'))
    return ''.join(out)

  def render_chat(self, messages: list[dict]) -> tuple[str, str]:
    return builtin_render_chat(messages)

  def render_prompt(self, messages: list[dict]) -> str:
    return builtin_render_prompt(messages)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from e


class HFTokenizer:
  """A checkpoint's `tokenizer.json` through the `tokenizers` library, with its chat template.

  Build it with `HFTokenizer.from_dir(directory)`. Encoding never adds special tokens by itself (the
  pipeline adds bos / eos explicitly).
  """

  def __init__(self, tok: Any, *, eos_id: int, pad_id: int, bos_id: int | None,
               chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
               stop_ids: Sequence[int] = ()):
    """Args: tok: a `tokenizers.Tokenizer`; eos_id / pad_id / bos_id: special ids; chat_template:
    a jinja2 chat template (None: the built-in format); special_tokens: names such as 'eos_token' ->
    their strings, passed to the template; stop_ids: more ids that end a generation (eos_id
    always does)."""
    self._tok = tok
    self._eos_id, self._pad_id, self._bos_id = int(eos_id), int(pad_id), bos_id
    self._stop_ids = tuple(sorted({self._eos_id, *(int(i) for i in stop_ids)}))
    self._chat_template = chat_template
    self._special_tokens = dict(special_tokens or {})
    self._template_kwargs = {}  # more template variables (`with_template_kwargs`)
    self._compiled = None  # the jinja2 template, compiled on first use (not pickled)
    decoder = tok.get_added_tokens_decoder()
    self._special_ids = frozenset(
        [i for i, t in decoder.items() if t.special] + [self._eos_id, self._pad_id]
        + ([] if bos_id is None else [bos_id]))

  @classmethod
  def from_dir(cls, directory: str) -> 'HFTokenizer':
    """Loads `directory/tokenizer.json` and its special ids and chat template.

    eos / pad / bos come from `tokenizer_config.json` (eos_token, pad_token, bos_token), else from
    `generation_config.json`, else `config.json` (*_token_id; the first of a list). pad falls back
    to eos; bos may be absent (None). The chat template is `tokenizer_config.json`'s
    `chat_template`, else `chat_template.jinja`; without one, chats use the built-in format.

    Raises:
      ValueError: no tokenizer.json, unreadable config files, or no eos token anywhere.
    """
    from tokenizers import Tokenizer as _HfTok  # pylint: disable=g-import-not-at-top
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isfile(path):
      raise ValueError(f'{directory} has no tokenizer.json')
    tok = _HfTok.from_file(path)
    tok_cfg = _read_json(os.path.join(directory, 'tokenizer_config.json'))
    id_cfgs = [_read_json(os.path.join(directory, n))
               for n in ('generation_config.json', 'config.json')]
    # Some configs nest the language-model settings (multimodal wrappers).
    id_cfgs += [c['text_config'] for c in id_cfgs if isinstance(c.get('text_config'), dict)]

    def resolve(name: str) -> int | None:
      token = tok_cfg.get(f'{name}_token')
      if isinstance(token, dict):
        token = token.get('content')
      if isinstance(token, str):
        token_id = tok.token_to_id(token)
        if token_id is None:
          raise ValueError(f'{directory}: {name}_token {token!r} is not in tokenizer.json')
        return token_id
      for cfg in id_cfgs:
        token_id = cfg.get(f'{name}_token_id')
        if isinstance(token_id, list):
          token_id = token_id[0] if token_id else None
        if token_id is not None:
          return int(token_id)
      return None

    eos_id, pad_id, bos_id = resolve('eos'), resolve('pad'), resolve('bos')
    if eos_id is None:
      raise ValueError(f'{directory}: no eos token in tokenizer_config.json, '
                       'generation_config.json or config.json')
    # Every listed eos id ends a generation (Qwen's generation_config lists end of turn and end of
    # text), though training appends only the first.
    listed = [c.get('eos_token_id') for c in id_cfgs]
    stop_ids = [i for x in listed for i in (x if isinstance(x, list) else [x]) if i is not None]
    template = tok_cfg.get('chat_template')
    if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
      named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
      template = named.get('default')
    jinja_path = os.path.join(directory, 'chat_template.jinja')
    if not isinstance(template, str) and os.path.isfile(jinja_path):
      with open(jinja_path, encoding='utf-8') as f:
        template = f.read()
    specials = {}
    for name in ('bos_token', 'eos_token', 'pad_token', 'unk_token'):
      value = tok_cfg.get(name)
      value = value.get('content') if isinstance(value, dict) else value
      if isinstance(value, str):
        specials[name] = value
    return cls(tok, eos_id=eos_id, pad_id=eos_id if pad_id is None else pad_id, bos_id=bos_id,
               chat_template=template if isinstance(template, str) else None,
               special_tokens=specials, stop_ids=stop_ids)

  def with_template_kwargs(self, kwargs: Mapping[str, Any]) -> 'HFTokenizer':
    """A copy that renders chats with these template variables as well."""
    out = copy.copy(self)
    out._template_kwargs = {**self._template_kwargs, **kwargs}
    return out

  vocab_size = property(lambda self: self._tok.get_vocab_size(with_added_tokens=True))
  chat_template = property(lambda self: self._chat_template)
  eos_id = property(lambda self: self._eos_id)
  stop_ids = property(lambda self: self._stop_ids)
  pad_id = property(lambda self: self._pad_id)
  bos_id = property(lambda self: self._bos_id)
  special_ids = property(lambda self: self._special_ids)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def render_chat(self, messages: list[dict]) -> tuple[str, str]:
    """(prompt, response) through the checkpoint's chat template (jinja2), else the built-in format.

    The prompt is the template applied to all but the last message with the generation prompt
    (the assistant header); the response is what the full conversation adds to it, trailing
    whitespace removed (the pipeline appends eos).

    Raises:
      ValueError: the last message is not an assistant turn, or the template renders the full
        conversation so that it does not start with the prompt.
    """
    if self._chat_template is None:
      return builtin_render_chat(messages)
    _check_chat(messages)
    prompt = self.render_prompt(messages[:-1])
    full = self._render(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
      raise ValueError('the chat template renders the conversation so that it does not start with '
                       'the rendered prompt; cannot tell the response apart: prompt '
                       f'{prompt[-80:]!r} vs full {full[:len(prompt)][-80:]!r}')
    return prompt, full[len(prompt):].rstrip()

  def render_prompt(self, messages: list[dict]) -> str:
    """The text a model continues to answer `messages` (a conversation awaiting the assistant's
    turn): the chat template with its generation prompt, else the built-in format.

    Raises:
      ValueError: a message that is not a {'role': str, 'content': str} turn, or the template
        failing on the messages.
    """
    if self._chat_template is None:
      return builtin_render_prompt(messages)
    check_turns(messages)
    return self._render(messages, add_generation_prompt=True)

  def _render(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
    import jinja2  # pylint: disable=g-import-not-at-top
    if self._compiled is None:
      self._compiled = _compile_template(self._chat_template)
    try:
      return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **{**self._special_tokens, **self._template_kwargs})
    except jinja2.exceptions.TemplateError as e:  # e.g. the template's raise_exception(...)
      raise ValueError(f'the chat template failed on these messages: {e}') from e

  def __getstate__(self):  # grain worker processes pickle the pipeline
    state = dict(self.__dict__)
    state['_compiled'] = None
    return state


def _compile_template(source: str):
  """Compiles a chat template in a jinja2 sandbox, with the helpers HF chat templates expect."""
  import datetime  # pylint: disable=g-import-not-at-top
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext as jinja_ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[jinja_ext.loopcontrols])
  env.filters['tojson'] = lambda x, indent=None, ensure_ascii=False: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii)
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(source)


def load_tokenizer(spec: str, chat_template_kwargs: str = '') -> Tokenizer:
  """'byte' or a directory holding tokenizer.json (a converted checkpoint carries its tokenizer),
  rendering chats with `chat_template_kwargs` ('' or a JSON object, `parse_template_kwargs`).

  Raises:
    ValueError: an unknown spec, a directory without tokenizer.json, or bad chat_template_kwargs.
  """
  kwargs = parse_template_kwargs(chat_template_kwargs)
  if spec == 'byte':
    tokenizer = ByteTokenizer()
  elif not os.path.isdir(spec):
    raise ValueError(f"unknown tokenizer {spec!r}: use 'byte' or a directory with tokenizer.json")
  elif os.path.isfile(os.path.join(spec, 'tokenizer.json')):
    tokenizer = HFTokenizer.from_dir(spec)
  else:
    raise ValueError(f"{spec} has no tokenizer.json; use 'byte' for the built-in byte tokenizer")
  return with_template_kwargs(tokenizer, kwargs)


def checkpoint_tokenizer(ckpt_dir: str, spec: str = '',
                         chat_template_kwargs: str = '') -> Tokenizer:
  """`spec` if given, else the checkpoint's tokenizer.json, else the byte tokenizer (a model trained
  from scratch on bytes carries none). Raises as `load_tokenizer`."""
  if not spec:
    spec = ckpt_dir if os.path.isfile(os.path.join(ckpt_dir, 'tokenizer.json')) else 'byte'
  return load_tokenizer(spec, chat_template_kwargs)
