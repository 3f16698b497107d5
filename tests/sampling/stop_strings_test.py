"""Stop strings: the cut is before the one complete first, so it is the same for every longer text;
the streamed pieces join to exactly that cut however the text is split."""
import numpy as np
import pytest

from flare_jax.sampling import stop_strings


def test_cut_is_before_the_stop_string_complete_first():
  assert stop_strings.cut('x = 1\n\ny = 2;', ['\n\n', ';']) == ('x = 1', True)
  assert stop_strings.cut('x = 1;\n\n', ['\n\n', ';']) == ('x = 1', True)
  assert stop_strings.cut('x = 1', ['\n\n']) == ('x = 1', False)
  assert stop_strings.cut('x = 1', []) == ('x = 1', False)
  assert stop_strings.cut('END', ['END']) == ('', True)
  # 'c' is complete before 'bcd' is, though 'bcd' begins first; of two ending together, the longer
  assert stop_strings.cut('abcd', ['bcd', 'c']) == ('ab', True)
  assert stop_strings.cut('abcd', ['cd', 'bcd', 'd']) == ('a', True)


def test_a_cut_text_is_cut_the_same_however_it_goes_on(rng):
  """What makes ending a decode at its first stop string safe: once a prefix holds one, every
  longer text is cut where that prefix is."""
  stop_sets = [['ab', 'b'], ['aba', 'b\n'], ['bab', 'a', 'ab\n'], ['\n\n', 'ba', 'aaaa']]
  for _ in range(300):
    text = ''.join(rng.choice(list('ab\n'), rng.integers(0, 14)))
    stops = stop_sets[rng.integers(len(stop_sets))]
    final = stop_strings.cut(text, stops)
    for end in range(len(text) + 1):
      if stop_strings.cut(text[:end], stops)[1]:
        assert stop_strings.cut(text[:end], stops) == final, (text, end, stops)


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


@pytest.mark.parametrize('stops', [['ab'], ['aab', 'b\n'], ['\n\n', 'ba', 'aaaa'], [],
                                   ['bab', 'a', 'ab\n']])
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


def test_stop_test_reads_each_rows_text():
  decode = lambda ids: ''.join(chr(i) for i in ids)
  test = stop_strings.stop_test(decode, [('ab',), (), ('b', 'zz')])
  ids = [ord(c) for c in 'xab']
  assert test(0, ids) and not test(0, ids[:2])
  assert not test(1, ids)  # no stop strings: never
  assert test(2, ids[:2] + [ord('b')])
  assert test(3, []) and test(7, ids)  # batch filler past the rows: at once
  # A trailing U+FFFD is a character still missing bytes, not text
  assert not stop_strings.stop_test(decode, [('\ufffd',)])(0, [120, 0xFFFD])
