"""The smallest honest end-to-end path, on an embedded default (no downloads, CPU is fine).

python -m launch.quickstart --workdir=runs/quickstart

1. builds a tiny random hybrid model (GDN + attention) and writes it as a Hugging Face Qwen3.5
   checkpoint (model.safetensors + config.json), 2. converts it with the importer (every tensor
   checked),
3. reloads the converted checkpoint and decodes a batch of ragged byte-level prompts with AR,
AR-Trust and Diffusion-Trust, 4. checks greedy AR-Trust == greedy AR token for token and reports
passes per token.
The weights are random, so the text is noise; the point is the machinery.
"""
import os
import shutil
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from flare_jax.checkpoint import hf_export
from flare_jax.checkpoint import hf_import
from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer
from flare_jax.sampling import sampler as sampler_lib
from launch import runtime

_WORKDIR = flags.DEFINE_string('workdir', 'runs/quickstart', 'Where checkpoints are written.')
_NEW = flags.DEFINE_integer('new_tokens', 24, 'Tokens to generate per prompt.')
_BLOCK = flags.DEFINE_integer('block_size', 4, 'AR-Trust / Diffusion-Trust block size.')

PROMPTS = ('def fibonacci(n):', 'The quick brown fox', '1 + 1 =')


def _encode(prompts):
  ids = [list(p.encode('utf-8')) for p in prompts]
  width = max(map(len, ids))
  batch = np.zeros((len(ids), width), np.int32)
  for i, row in enumerate(ids):
    batch[i, :len(row)] = row
  return batch, np.array([len(r) for r in ids], np.int32)


def _decode(ids) -> str:
  return bytes(int(i) for i in ids if int(i) < 256).decode('utf-8', errors='replace')


def main(argv):
  del argv
  workdir = os.path.abspath(_WORKDIR.value)
  hf_dir, ckpt_dir = os.path.join(workdir, 'hf_tiny'), os.path.join(workdir, 'flare_tiny')
  for d in (hf_dir, ckpt_dir):
    shutil.rmtree(d, ignore_errors=True)
  os.makedirs(hf_dir)
  cfg = config_lib.VARIANTS['tiny'].replace(
      layer_types=(config_lib.LINEAR, config_lib.LINEAR, config_lib.LINEAR, config_lib.FULL))
  print(f'[1/4] random tiny Qwen3.5-layout model ({cfg.num_layers} layers: 3 GDN + 1 attention) '
        f'-> {hf_dir}')
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  hf_export.write_hf_dir(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, hf_dir, 'float32')
  print('[2/4] convert (python -m launch.convert_hf)')
  hf_import.convert_hf_checkpoint(hf_dir, ckpt_dir, log=lambda m: print('      ' + m))
  print('[3/4] reload and decode')
  loaded = model_io.load_model(ckpt_dir)
  sampler = sampler_lib.Sampler(loaded)
  prompts, lengths = _encode(PROMPTS)
  results = {}
  modes = {
      'ar': sampler_lib.SamplerConfig(mode='ar', max_new_tokens=_NEW.value),
      'ar_trust': sampler_lib.SamplerConfig(mode='ar_trust', block_size=_BLOCK.value,
                                            max_new_tokens=_NEW.value),
      'diffusion_trust': sampler_lib.SamplerConfig(
          mode='diffusion_trust', block_size=_BLOCK.value, commit='fixed', tokens_per_pass=2,
          max_new_tokens=_NEW.value),
  }
  for name, scfg in modes.items():
    t0 = time.perf_counter()
    res = jax.block_until_ready(sampler.generate(prompts, lengths, scfg))
    secs = time.perf_counter() - t0
    results[name] = res
    passes = float(np.mean(np.asarray(res.n_forward) - 1)) / _NEW.value
    print(f'      {name:16s} {passes:.2f} passes/token, {secs:.1f} s (incl. compile)')
  print('[4/4] check')
  same = np.array_equal(results['ar'].tokens, results['ar_trust'].tokens)
  for p, row in zip(PROMPTS, np.asarray(results['ar'].tokens)):
    print(f'      {p!r} -> {_decode(row)!r}')
  print(f'      greedy AR-Trust identical to greedy AR: {same}')
  if not same:
    raise SystemExit('AR-Trust diverged from AR')


if __name__ == '__main__':
  runtime.run(main)
