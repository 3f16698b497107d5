"""Stop strings: text that ends a completion, which is cut just before the first one.

Decoding itself stops at token ids (`SamplerConfig.eos_ids`); a stop string can span tokens, or
be part of one, so it is matched on the decoded text: `cut` on a finished completion,
`StopStringStream` on text as it is streamed, and `stop_test` on a batch's rows between segments
of its decode (`Sampler.generate`'s `should_stop`), which ends each row soon after its stop string.
"""
import re
from collections.abc import Callable, Sequence

_ESCAPES = {'n': '\n', 't': '\t', 'r': '\r', '\\': '\\'}


def unescape(text: str) -> str:
  r"""A stop string as typed on a command line: \n, \t, \r and \\ read as escapes.

  Raises:
    ValueError: any other backslash escape (or a lone backslash at the end).
  """
  def one(m: re.Match) -> str:
    if m.group(1) not in _ESCAPES:
      known = ', '.join('\\' + k for k in _ESCAPES)
      raise ValueError(f'{text!r}: unknown escape \\{m.group(1)} (known: {known})')
    return _ESCAPES[m.group(1)]
  return re.sub(r'\\(.?)', one, text, flags=re.DOTALL)


def check(stops: Sequence[str]) -> tuple[str, ...]:
  """The stop strings as a tuple.

  Raises:
    ValueError: an empty stop string (it would end every completion before it starts).
  """
  if any(not s for s in stops):
    raise ValueError('a stop string must not be empty')
  return tuple(stops)


def from_json(value) -> tuple[str, ...]:
  """A task or prompt line's "stop" value as stop strings.

  Raises:
    ValueError: anything but a list of non-empty strings.
  """
  if not (isinstance(value, list) and all(isinstance(x, str) and x for x in value)):
    raise ValueError('"stop" must be a list of non-empty strings')
  return tuple(value)


def cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """(text before the stop string that is complete first, whether there was one).

  "First" is by where an occurrence ends (of two ending at one place, the longer), as when text
  is read as it is generated: so the cut of a text that holds a stop string is also the cut of
  every longer text that begins with it, and decoding may end as soon as one appears. (Of stops
  ['bcd', 'c'], 'abcd' is cut to 'ab'.)
  """
  ends = [(i + len(s), -len(s)) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
  if not ends:
    return text, False
  end, minus_len = min(ends)
  return text[:end + minus_len], True


def stop_test(decode: Callable[[Sequence[int]], str], stops: Sequence[Sequence[str]]):
  """`Sampler.generate`'s `should_stop` for stop strings: row r stops once the text of its ids
  holds one of `stops[r]` (rows past the end of `stops` stop at once: batch filler). `decode`:
  ids -> text (a tokenizer's). A trailing U+FFFD (a character still missing bytes) is left out."""
  def should_stop(row: int, ids) -> bool:
    if row >= len(stops):
      return True
    if not stops[row]:
      return False
    return cut(decode([int(i) for i in ids]).rstrip('\ufffd'), stops[row])[1]
  return should_stop


def _partial_tail(text: str, stops: Sequence[str]) -> int:
  """Length of the longest end of `text` that begins some stop string without completing it."""
  longest = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), longest, -1):
      if text.endswith(s[:k]):
        longest = k
        break
  return longest


class StopStringStream:
  """Streamed text cut at the first stop string.

  `add(piece)` returns the new text that is certainly before any stop string: a tail that could
  begin one is held back until later text shows whether it does. Once a stop string has appeared,
  `stopped` is True and nothing more is returned; `flush` returns the held-back tail at the end.
  Joined, the returned pieces are `cut(all the text, stops)[0]`.
  """

  def __init__(self, stops: Sequence[str]):
    self._stops = check(stops)
    self._text = ''
    self._shown = 0
    self.stopped = False

  def add(self, piece: str) -> str:
    if self.stopped:
      return ''
    self._text += piece
    text, self.stopped = cut(self._text, self._stops)
    # No stop string can begin before `_shown` (it would have been held back), so end >= _shown.
    end = len(text) if self.stopped else len(text) - _partial_tail(text, self._stops)
    new, self._shown = text[self._shown:end], end
    return new

  def flush(self) -> str:
    if self.stopped:
      return ''
    new, self._shown = self._text[self._shown:], len(self._text)
    return new
