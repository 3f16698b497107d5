"""The end-to-end demo (launch.demo) on a CPU: a 4-layer hybrid byte-level model on the Python
standard library's own source plus generated arithmetic, trained AR from scratch, then FLARE.

Run: python -m launch.demo --config=configs/demo_cpu.py --workdir=runs/demo
The top-level keys are stage 1 (AR from scratch); stage 2 (FLARE, initialised from stage 1's model)
takes objective 'flare' and the demo.flare_* settings. Override anything:
--config.demo.eval_examples=32
"""
import ml_collections as mlc

from configs import base
from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  common.parse_arg(arg)
  c = base.get_config()
  c.model.variant = 'small'
  c.model.dtype = 'float32'
  c.objective.name = 'ar'
  c.objective.block_size = 4
  c.objective.num_views = 2
  c.data.source = 'jsonl'  # launch.demo writes the corpus and sets data.paths
  c.data.tokenizer = 'byte'
  c.data.seq_len = 128
  c.data.batch_size = 8
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.0
  c.train.num_steps = 1800  # 900: arithmetic 0.33, next-line answers all spaces (2026-12-02 runs)
  c.train.log_every = 50
  c.ckpt.every = 1000
  c.demo = mlc.ConfigDict()
  c.demo.flare_steps = 150  # stage 2 optimizer steps
  c.demo.flare_lr = 1e-3  # stage 2 peak learning rate
  c.demo.stdlib_files = 150  # training files from the standard library (0 = all)
  c.demo.arithmetic_examples = 100000
  c.demo.arithmetic_max_operand = 10  # operands 0..9: facts a small model learns in minutes
  c.demo.eval_examples = 48  # per task
  c.demo.eval_batch_size = 16
  c.demo.max_new_tokens = 40
  c.demo.ppl_rows = 64  # held-out rows of seq_len tokens for perplexity
  c.demo.modes = ('ar;ar_trust:b=4;diffusion_trust:b=4,threshold=0.9;'
                  'diffusion_trust:b=4,threshold=0.7;diffusion_trust:b=4,k=2;'
                  'diffusion_trust:b=8,k=4')
  return c
