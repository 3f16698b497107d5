"""Example -> token ids + response mask (eos appended), and length policies for long documents."""
import numpy as np


def render(example: dict, tokenizer) -> tuple[str, str]:
  """(prompt text, response text) of an example; chat messages use a simple built-in format."""
  if 'text' in example:
    return '', example['text']
  if 'messages' in example:
    turns = example['messages']
    prompt = ''.join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns[:-1])
    return prompt + '<|im_start|>assistant\n', turns[-1]['content']
  return example['prompt'], example['response']


def tokenize(example: dict, tokenizer) -> dict:
  """{'tokens': int32 [n], 'response_mask': bool [n]}, eos appended to the response."""
  prompt, response = render(example, tokenizer)
  p = tokenizer.encode(prompt) if prompt else []
  r = tokenizer.encode(response) + [tokenizer.eos_id]
  return {'tokens': np.asarray(p + r, np.int32),
          'response_mask': np.asarray([False] * len(p) + [True] * len(r), bool)}


def fit_length(ex: dict, seq_len: int, policy: str) -> list[dict]:
  """Documents longer than seq_len: 'split' into pieces, 'truncate', or 'drop'."""
  n = len(ex['tokens'])
  if n <= seq_len:
    return [ex]
  if policy == 'drop':
    return []
  if policy == 'truncate':
    return [{k: v[:seq_len] for k, v in ex.items()}]
  if policy == 'split':
    return [{k: v[i:i + seq_len] for k, v in ex.items()} for i in range(0, n, seq_len)]
  raise ValueError(f"long_docs must be 'split', 'truncate' or 'drop', got {policy!r}")
