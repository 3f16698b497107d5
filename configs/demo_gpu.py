"""The end-to-end demo (launch.demo) on one GPU: an 8-layer D=512 hybrid byte-level model, longer.

Run: python -m launch.demo --config=configs/demo_gpu.py --workdir=runs/demo_gpu
"""
import ml_collections as mlc

from configs import common
from configs import demo_cpu


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  common.parse_arg(arg)
  c = demo_cpu.get_config()
  c.model.variant = 'medium'
  c.model.dtype = 'bfloat16'
  c.data.seq_len = 1024
  c.data.batch_size = 32
  c.optim.lr = 1e-3
  c.train.num_steps = 1500
  c.demo.flare_lr = 3e-4
  c.demo.flare_steps = 600  # H200: 220 s + 153 s of training, then ~4 min of evaluation
  c.train.log_every = 100
  c.demo.stdlib_files = 0
  c.demo.arithmetic_max_operand = 100
  c.demo.eval_examples = 256
  c.demo.eval_batch_size = 64
  c.demo.ppl_rows = 256
  return c
