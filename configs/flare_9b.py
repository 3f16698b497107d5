"""FLARE conversion of a Qwen3.5-9B-shaped model (shapes from
flare_jax.model.config.VARIANTS['9b']).

Convert the checkpoint first:
  python -m launch.convert_hf --hf_dir=/path/Qwen3.5-9B --out=/ckpt/q35_9b
Run: python -m launch.train --config=configs/flare_9b.py --workdir=/runs/flare_9b \
       --config.init_from=/ckpt/q35_9b --config.data.source=jsonl \
       --config.data.paths=/data/sft.jsonl
"""
import ml_collections as mlc

from configs import base
from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  arg = common.parse_arg(arg, objective='flare', fsdp=-1, tensor=1)
  c = base.get_config()
  c.model.variant = '9b'
  c.model.dtype = 'bfloat16'
  c.model.remat = 'block'
  c.objective.name = arg.objective
  c.data.tokenizer = ''  # the init checkpoint's tokenizer.json
  c.data.seq_len = 4096
  c.data.batch_size = 32
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 50
  c.train.num_steps = 5000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, arg.fsdp, arg.tensor
  return c
