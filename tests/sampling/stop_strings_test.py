"""Stop strings: the cut is at the earliest occurrence of any of them, and the streamed pieces join
to exactly that cut however the text is split."""
import numpy as np
import pytest

from flare_jax.sampling import stop_strings


def test_cut_is_at_the_earliest_stop_string():
  assert stop_strings.cut('x = 1\n\ny = 2;', ['\n\n', ';']) == ('x = 1', True)
  assert stop_strings.cut('x = 1;\n\n', ['\n\n', ';']) == ('x = 1', True)
  assert stop_strings.cut('x = 1', ['\n\n']) == ('x = 1', False)
  assert stop_strings.cut('x = 1', []) == ('x = 1', False)
  assert stop_strings.cut('END', ['END']) == ('', True)


def test_a_tail_that_may_begin_a_stop_string_is_held_back():
  stream = stop_strings.StopStringStream(['abc'])
  assert stream.add('xa') == 'x'
  assert stream.add('b') == ''
  assert stream.add('d') == 'abd'  # 'abd' begins no stop string
  assert stream.add('ab') == ''
  assert stream.add('c tail') == '' and stream.stopped
  assert stream.add('more') == '' and stream.flush() == ''
  unfinished = stop_strings.StopStringStream(['abc'])
  assert unfinished.add('zab') == 'z' and unfinished.flush() == 'ab'


@pytest.mark.parametrize('stops', [['ab'], ['aab', 'b\n'], ['\n\n', 'ba', 'aaaa'], []])
def test_streamed_pieces_join_to_the_cut_text(rng, stops):
  for _ in range(200):
    text = ''.join(rng.choice(list('ab\n'), rng.integers(0, 12)))
    bounds = sorted(rng.integers(0, len(text) + 1, rng.integers(0, 4)))
    pieces = [text[i:j] for i, j in zip([0, *bounds], [*bounds, len(text)])]
    stream = stop_strings.StopStringStream(stops)
    shown = ''.join(stream.add(p) for p in pieces) + stream.flush()
    assert (shown, stream.stopped) == stop_strings.cut(text, stops), (text, pieces)


def test_an_empty_stop_string_is_refused():
  with pytest.raises(ValueError, match='must not be empty'):
    stop_strings.StopStringStream(['ok', ''])
  assert stop_strings.check(['a', '\n']) == ('a', '\n')


def test_no_piece_is_shown_before_it_is_known_to_precede_every_stop_string():
  """Every prefix shown so far is a prefix of the final cut (nothing shown is taken back)."""
  rng = np.random.default_rng(1)
  for _ in range(200):
    text = ''.join(rng.choice(list('abc'), 10))
    stream, shown = stop_strings.StopStringStream(['bca', 'cc']), ''
    final, _ = stop_strings.cut(text, ['bca', 'cc'])
    for ch in text:
      shown += stream.add(ch)
      assert final.startswith(shown)


def test_command_line_escapes():
  assert stop_strings.unescape(r'\n\n') == '\n\n'
  assert stop_strings.unescape(r'a\tb\\n\r') == 'a\tb\\n\r'
  assert stop_strings.unescape('plain: ü') == 'plain: ü'
  for bad in (r'\q', 'end\\'):
    with pytest.raises(ValueError, match='unknown escape'):
      stop_strings.unescape(bad)
