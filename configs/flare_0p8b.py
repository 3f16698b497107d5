"""GPU throughput preset: a Qwen3.5-0.8B-shaped model from scratch at T=4096 (one GPU).

Compares the objectives' step time, tokens/s and MFU on the same model and data:
Run: python -m launch.train --config=configs/flare_0p8b.py:objective=ar --workdir=/runs/ar_0p8b
     python -m launch.train --config=configs/flare_0p8b.py:objective=flare \
       --workdir=/runs/flare_0p8b
"""
import ml_collections as mlc

from configs import base
from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_arg(arg, objective='flare', steps=1000)
  c = base.get_config()
  c.model.variant = '0.8b'
  c.model.dtype = 'bfloat16'
  c.model.remat = 'block'
  c.objective.name = arg.objective
  c.objective.block_size = 4
  c.objective.num_views = 2
  c.data.source = 'arithmetic'
  c.data.tokenizer = 'byte'
  c.data.seq_len = 4096
  c.data.batch_size = 4
  c.data.num_examples = 200000
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 100
  c.train.num_steps = arg.steps
  c.train.log_every = 10
  c.ckpt.every = 500
  return c
