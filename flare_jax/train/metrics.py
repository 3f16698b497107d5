"""Metrics sinks (JSONL + TensorBoard event files), FLOP counting and MFU."""
import json
import os
import time

from flare_jax.model import config as config_lib

# Dense bf16 peak FLOP/s per device, by substring of `device_kind` (vendor datasheets), first
# match wins: a name that contains another comes before it (H200 / H20, L40S / L40 / L4).
_PEAK_FLOPS = (('B200', 2250e12), ('GH200', 989e12), ('H200', 989e12), ('H20', 148e12),
               ('H100 PCIe', 756e12), ('H100', 989e12), ('H800', 989e12), ('A100', 312e12),
               ('A800', 312e12), ('L40S', 362e12), ('L40', 181e12), ('L4', 121e12),
               ('TPU v6', 918e12), ('TPU v5p', 459e12), ('TPU v5', 197e12), ('TPU v4', 275e12))


def peak_flops_per_device(device_kind: str, override: float = -1.0) -> float | None:
  if override > 0:
    return override
  for key, flops in _PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return flops
  return None


def matmul_params(cfg: config_lib.ModelConfig) -> int:
  """Parameters touched by a matmul per token (projections, MLP, LM head);
  embeddings lookups excluded."""
  d = cfg.hidden_size
  attn = d * (2 * cfg.num_attention_heads * cfg.head_dim) + 2 * d * (
      cfg.num_key_value_heads * cfg.head_dim) + cfg.num_attention_heads * cfg.head_dim * d
  vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
  gdn = d * (cfg.linear_conv_dim + vd + 2 * cfg.linear_num_value_heads) + vd * d
  mlp = 3 * d * cfg.intermediate_size
  n_full = sum(t == config_lib.FULL for t in cfg.layer_types)
  n_lin = cfg.num_layers - n_full
  return n_full * (attn + mlp) + n_lin * (gdn + mlp) + d * cfg.vocab_size


def train_flops_per_row(cfg: config_lib.ModelConfig, seq_len: int, streams: int,
                        visible_fraction: float = 1.0) -> float:
  """Training FLOPs (fwd + bwd = 3x fwd) for one packed row processed as `streams` x seq_len tokens.

  Counts matmul params (2 FLOPs per MAC), causal attention scores/values over the visible keys, and
  the gated delta rule's state products (~6 K V per token and value head, chunked form).
  """
  tokens = streams * seq_len
  dense = 2 * matmul_params(cfg) * tokens
  n_full = sum(t == config_lib.FULL for t in cfg.layer_types)
  n_lin = cfg.num_layers - n_full
  mean_keys = seq_len / 2 * visible_fraction
  attn = n_full * 4 * cfg.num_attention_heads * cfg.head_dim * mean_keys * tokens
  gdn = n_lin * 6 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * (
      cfg.linear_value_head_dim + 64) * tokens
  return 3.0 * (dense + attn + gdn)


class MetricsWriter:
  """Writes scalars to workdir/metrics.jsonl and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time(), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
