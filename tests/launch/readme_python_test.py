"""The README's "From Python" block runs as written, on the tiny test checkpoint."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), 'README.md')


def test_the_readme_python_block_runs(ckpt, capsys):
  text = open(README).read()
  block = re.search(r'## From Python\n.*?```python\n(.*?)```', text, re.DOTALL).group(1)
  assert "ckpt = 'runs/demo/flare/model'" in block
  exec(block.replace("'runs/demo/flare/model'", repr(ckpt)), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out.splitlines()
  assert [line.split()[0] for line in printed] == ['ar', 'ar_trust', 'diffusion_trust']
