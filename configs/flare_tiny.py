"""Tiny CPU preset (2 layers: GDN + attention, D=64, byte vocabulary). Tests use only this file.

Run: python -m launch.train --config=configs/flare_tiny.py --workdir=/tmp/flare_tiny
     python -m launch.train --config=configs/flare_tiny.py:objective=ar,steps=50 --workdir=/tmp/t
"""
import ml_collections as mlc

from configs import base
from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_arg(arg, objective='flare', steps=200)
  c = base.get_config()
  c.model.variant = 'tiny'
  c.model.dtype = 'float32'
  c.objective.name = arg.objective
  c.data.source = 'arithmetic'
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.train.num_steps = arg.steps
  c.train.log_every = 10
  c.ckpt.every = 100
  return c
