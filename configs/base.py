"""Base config: every key, with a comment. Other config files import it and override.

Run: python -m launch.train --config=configs/base.py --workdir=/tmp/flare_base
"""
import ml_collections as mlc

from flare_jax import sharding


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  del arg
  c = mlc.ConfigDict()

  # --- model: shapes come from `variant` (flare_jax.model.config.VARIANTS) or from `init_from`. ---
  c.model = mlc.ConfigDict()
  c.model.variant = 'tiny'  # VARIANTS key; ignored when init_from names a converted checkpoint
  c.model.dtype = 'bfloat16'  # compute dtype (params stay in param_dtype)
  c.model.param_dtype = 'float32'  # master weights
  c.model.remat = 'none'  # 'none' | 'block': rematerialise each decoder block in the backward
  # Scan over repeats of the layer pattern in training (compile time ~ one group, not every layer).
  # Off: on an H200 the 0.8B flare step compiled in 47 s instead of 90 s with it, but peaked at
  # 37.3 GiB instead of 20.2 with XLA's latency-hiding scheduler, which train.latency_hiding='auto'
  # turns off for it on one GPU (24.4 GiB; docs/benchmarks.md).
  c.model.scan_layers = False
  c.model.mask_token_id = -1  # [MASK] id; -1 keeps the model's default (last embedding row)
  c.model.gdn_chunk_size = 64  # chunk of the chunked gated delta rule
  c.model.attn_q_tile = 512  # query tile of the XLA attention path

  # --- kernels: implementation per op; 'auto' picks the best for the backend. ---
  c.kernels = mlc.ConfigDict()
  c.kernels.gdn = 'auto'  # 'auto' (triton on GPU, else xla) | 'xla' | 'pallas' | 'triton'
  c.kernels.attn = 'auto'  # 'auto' (pallas on GPU, else xla) | 'xla' | 'pallas'
  # Backward of the two-stream short conv + SiLU: 'manual' (hand-written) | 'autodiff'
  c.kernels.gdn_conv_backward = 'manual'

  # --- objective ---
  c.objective = mlc.ConfigDict()
  # 'flare' (two-stream) | 'ar' (plain SFT, the cheap data-screening proxy)
  c.objective.name = 'flare'
  c.objective.block_size = 4  # B: targets per noisy block (1..32)
  c.objective.num_views = 2  # V: noisy views (1 or 2; 2 = complementary masks)
  c.objective.logit_shift = True  # noisy slot p predicts token p+1, like the AR stream
  c.objective.noise = 'uniform'  # 'uniform' | 'all_masked' | 'position_dependent'
  c.objective.noise_eps = 1e-3  # t ~ U(eps, 1]
  # GDN noisy blocks: 'auto' (on GPU the fused Triton forward, with the backward kernels for bf16
  # at blocks up to 16; else 'chunked') | 'chunked' (all blocks at once, no token scan) | 'lean' |
  # 'simple' (references) | a fused kernel schedule (two_stream_gdn.KERNEL_SCHEDULES)
  c.objective.gdn_schedule = 'auto'
  # Cross-entropy sequence tile per row: fp32 logits of batch x loss_tile tokens at once; fewer,
  # larger tiles accumulate the LM-head gradient fewer times (0.8B step: 14 ms of fp32 [vocab, D]
  # accumulation per step at 512)
  c.objective.loss_tile = 512

  # --- data (flare_jax.data.pipeline) ---
  c.data = mlc.ConfigDict()
  c.data.source = 'arithmetic'  # 'jsonl' | 'array_record' | 'stdlib' | 'arithmetic'
  c.data.paths = ''  # comma-separated files for jsonl / array_record
  # held-out files of the same format (train.eval_every); stdlib / arithmetic hold out their own
  c.data.eval_paths = ''
  c.data.weights = ''  # comma-separated, one per data.paths entry: sample each file by weight
  # variables for the tokenizer's chat template (a JSON object), e.g. '{"enable_thinking": false}'
  c.data.chat_template_kwargs = ''
  c.data.tokenizer = 'byte'  # 'byte' | a directory with tokenizer.json ('' = the init checkpoint's)
  c.data.seq_len = 128  # packed row length T
  c.data.batch_size = 8  # global batch (rows per optimizer step, before accumulation split)
  c.data.seed = 0  # shuffle seed
  c.data.num_epochs = -1  # -1: repeat forever
  c.data.on_malformed = 'skip'  # 'skip' (count and report with line numbers) | 'error'
  c.data.long_docs = 'split'  # documents longer than seq_len: 'split' | 'truncate' | 'drop'
  c.data.worker_count = 0  # grain worker processes (0 = in-process)
  c.data.num_examples = 20000  # size of the generated 'arithmetic' source
  c.data.packing_bins = 16  # rows the first-fit packer fills at once (more = tighter packing)

  # --- optimizer: AdamW, linear warmup then cosine decay ---
  c.optim = mlc.ConfigDict()
  c.optim.lr = 3e-4  # peak learning rate
  c.optim.warmup_steps = 100  # linear warmup from 0
  # after warmup: 'cosine' or 'linear' decay to lr * min_lr_ratio at train.num_steps, 'constant'
  # (stay at lr), or 'wsd' (warmup-stable-decay: hold lr, then decay linearly to lr * min_lr_ratio
  # over the last decay_fraction of train.num_steps)
  c.optim.schedule = 'cosine'
  c.optim.min_lr_ratio = 0.1  # the decay's floor as a fraction of lr
  c.optim.decay_fraction = 0.2  # 'wsd' only: share of train.num_steps spent decaying
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  # decoupled; not applied to norms, biases-like vectors or embeddings' scale
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0  # global-norm clipping (<= 0 disables)
  c.optim.grad_accum = 1  # micro-batches per step (batch_size must divide)

  # --- training loop ---
  c.train = mlc.ConfigDict()
  c.train.num_steps = 1000  # optimizer steps
  c.train.log_every = 10  # progress line + metrics every N steps
  c.train.seed = 0  # params init / noise RNG
  c.train.peak_flops = -1.0  # per-device peak FLOP/s for MFU; -1 = guess from the device kind
  # XLA's GPU latency-hiding scheduler for the train step: 'auto' (off for a scanned step on one
  # GPU, where it hides no communication and cost a third more memory; else XLA's default) |
  # 'on' | 'off' (both override XLA_FLAGS)
  c.train.latency_hiding = 'auto'
  # JAX persistent compilation cache: '' (off) | 'workdir' (workdir/xla_cache) | a directory. A
  # restarted run skips recompiling its step (minutes for the 0.8B+ presets).
  c.train.compilation_cache = 'workdir'
  # stop this invocation after N steps (checkpointing first); -1 = run to the end
  c.train.stop_after = -1
  # a run resumed on another number of processes cannot resume the data stream (one position per
  # process): True restores the model and optimizer and starts the data from its beginning,
  # False stops with an error. A resume on as many processes always continues the stream.
  c.train.restart_data = False
  # held-out loss (the objective's, on the 'heldout' split: data.eval_paths for files) every N
  # steps and at the end, over the same eval_batches batches each time; 0 = off
  c.train.eval_every = 0
  c.train.eval_batches = 4
  # 'FIRST:LAST': a jax.profiler trace of steps FIRST..LAST (as logged, inclusive) into
  # workdir/profile (TensorBoard's profile plugin, or the *.trace.json.gz in Perfetto); '' = off.
  # Step 1 includes compilation.
  c.train.profile_steps = ''

  # --- mesh and sharding: strategy is picked by the mesh shape alone (size-1 axes are free). ---
  c.mesh = mlc.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = sharding.DEFAULT_RULES  # logical axis -> mesh axis table (one source of truth)

  # --- checkpoints ---
  c.ckpt = mlc.ConfigDict()
  c.ckpt.every = 200  # save every N steps (and at the end)
  c.ckpt.keep = 3  # keep the N newest
  c.ckpt.async_save = True  # orbax async checkpointing

  # '' = from scratch; else a converted checkpoint dir (python -m launch.convert_hf)
  c.init_from = ''
  return c
