"""FLARE conversion of a Qwen3.5-9B-shaped model (shapes from
flare_jax.model.config.VARIANTS['9b']).

Convert the checkpoint first:
  python -m launch.convert_hf --hf_dir=/path/Qwen3.5-9B --out=/ckpt/q35_9b
Run: python -m launch.train --config=configs/flare_9b.py --workdir=/runs/flare_9b \
       --config.init_from=/ckpt/q35_9b --config.data.source=jsonl \
       --config.data.paths=/data/sft.jsonl
"""
import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return common.hf_conversion('9b', arg)
