"""FLARE conversion of a Qwen3.5-2B-shaped model (shapes from
flare_jax.model.config.VARIANTS['2b']).

Convert the checkpoint first:
  python -m launch.convert_hf --hf_dir=/path/Qwen3.5-2B --out=/ckpt/q35_2b
Run: python -m launch.train --config=configs/flare_2b.py --workdir=/runs/flare_2b \
       --config.init_from=/ckpt/q35_2b --config.data.source=jsonl \
       --config.data.paths=/data/sft.jsonl
"""
import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  return common.hf_conversion('2b', arg)
