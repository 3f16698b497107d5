"""train_and_evaluate(config, workdir): the one training loop."""
import json
import os
import time

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.train import checkpointing
from flare_jax.train import metrics as metrics_lib
from flare_jax.train import objectives
from flare_jax.train import optim
from flare_jax.train import preemption
from flare_jax.train import profiling
from flare_jax.train import state as state_lib
from flare_jax.train import step as step_lib


class ConfigError(ValueError):
  """The run cannot start: its config, tokenizer or data failed a check, or the workdir's
  checkpoint holds another model or optimizer. Nothing was written."""


class NonFiniteLossError(RuntimeError):
  """Raised when a step's loss is NaN/inf; the last good checkpoint is kept."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)
  logging.info(msg)


def _flat(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _config_changes(old_json: str, new_json: str, limit: int = 20) -> list[str]:
  """'key: old -> new' for every config key that differs between two config.json texts (added
  and removed keys as missing), at most `limit` lines and a count of the rest."""
  old, new = _flat(json.loads(old_json)), _flat(json.loads(new_json))
  missing = '(missing)'
  lines = [f'{k}: {json.dumps(old.get(k, missing))} -> {json.dumps(new.get(k, missing))}'
           for k in sorted(old.keys() | new.keys()) if old.get(k, missing) != new.get(k, missing)]
  return lines[:limit] + ([f'... and {len(lines) - limit} more'] if len(lines) > limit else [])


def _changes_since_saved(c: mlc.ConfigDict, workdir: str) -> tuple[str, list[str] | None]:
  """(workdir/config.json, how config `c` differs from it; None when there is no such file)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return path, None
  with open(path) as f:
    return path, _config_changes(f.read(), c.to_json_best_effort(indent=2))


def _saved_config_note(c: mlc.ConfigDict, workdir: str) -> str:
  """How this run's config differs from workdir/config.json (the run that wrote the checkpoints),
  for an error that a different config explains."""
  path, changes = _changes_since_saved(c, workdir)
  if changes is None:
    return f'{path} is missing: compare the run that wrote the checkpoints with this one.'
  if not changes:
    return f'This run\'s config equals {path}.'
  return (f'This run\'s config differs from {path} (the one that wrote the checkpoints) in:\n  '
          + '\n  '.join(changes) + '\nResume with that config, or train into a new --workdir.')


def _record_config(c: mlc.ConfigDict, workdir: str, start_step: int) -> None:
  """Writes workdir/config.json (process 0). A run resuming at `start_step` with a config that
  differs from the one there logs the changed keys and keeps the earlier file as
  config.step{start_step}.json, so that every config a checkpoint saw is on disk."""
  if jax.process_index() != 0:
    return
  path, changes = _changes_since_saved(c, workdir)
  if start_step and changes:
    kept = os.path.join(workdir, f'config.step{start_step}.json')
    os.replace(path, kept)
    _log(f'config changed since the run that wrote step {start_step} (its config is now '
         f'{kept}):\n  ' + '\n  '.join(changes))
  with open(path, 'w') as f:
    f.write(c.to_json_best_effort(indent=2))


def _duration(seconds: float) -> str:
  """'1h02m', '14m56s' or '42s'."""
  s = int(round(seconds))
  if s >= 3600:
    return f'{s // 3600}h{s % 3600 // 60:02d}m'
  return f'{s // 60}m{s % 60:02d}s' if s >= 60 else f'{s}s'


def _global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _checked_setup(c: mlc.ConfigDict):
  """Checks the run's config, tokenizer and data and opens them: (model config, loss fn, batch
  validator, mesh, rules, optimizer, data iterator, held-out batches or None). Writes nothing."""
  model_cfg = state_lib.resolve_model_config(c)
  # The objective's settings are checked here, before the data and model are built.
  loss_fn = objectives.make_loss_fn(c, model_cfg)
  validate = objectives.make_batch_validator(c, model_cfg)
  # The optimizer's settings too (cheap), before the tokenizer and the data are opened.
  tx = optim.make_optimizer(c.optim, c.train.num_steps)
  warning = optim.schedule_warning(c.optim, c.train.num_steps)
  if warning:
    _log(f'warning: {warning}')
  if c.train.eval_every > 0 and c.train.eval_batches < 1:
    raise ValueError(f'train.eval_batches must be >= 1, got {c.train.eval_batches}')
  mesh = shd.make_mesh(dict(data=c.mesh.data, fsdp=c.mesh.fsdp, tensor=c.mesh.tensor))
  rules = tuple(tuple(r) for r in c.sharding_rules)
  _log(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}, '
       f'processes: {jax.process_count()}, mesh: {dict(mesh.shape)}')
  _log(f'model: {json.dumps(model_cfg.to_dict(), sort_keys=True)}')

  from flare_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from flare_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok_spec = c.data.tokenizer or c.init_from
  if not tok_spec:
    raise ValueError('data.tokenizer is empty and there is no init_from checkpoint to take it from')
  tokenizer = tokenizer_lib.load_tokenizer(tok_spec, c.data.chat_template_kwargs)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} ids, '
                     f'model embeds {model_cfg.vocab_size}')
  data_iter = pipeline.make_iterator(c.data, tokenizer, process_index=jax.process_index(),
                                     process_count=jax.process_count())
  report = getattr(data_iter, 'report', None)
  if callable(report):
    _log(report())
  if model_cfg.param_dtype != 'float32':
    _log(f'warning: model.param_dtype={model_cfg.param_dtype} keeps the master weights and '
         "AdamW's moments in it too: updates smaller than its rounding step are lost (float32 is "
         'the usual choice; model.dtype sets the compute dtype)')
  heldout = None
  if c.train.eval_every > 0:
    # The split repeats if it is short, so that every process gets eval_batches batches.
    heldout_cfg = c.data.copy_and_resolve_references()
    heldout_cfg.num_epochs = -1
    it = pipeline.make_iterator(heldout_cfg, tokenizer, process_index=jax.process_index(),
                                process_count=jax.process_count(), split='heldout')
    heldout = []
    for batch in it:
      validate(batch)
      heldout.append(batch)
      if len(heldout) == c.train.eval_batches:
        break
    if not heldout:
      raise ValueError('the held-out split gave no batch (train.eval_every > 0)')
  return model_cfg, loss_fn, validate, mesh, rules, tx, data_iter, heldout


def train_and_evaluate(c: mlc.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains per config `c`, writing checkpoints and metrics to `workdir`;
  resumes if it has a checkpoint.

  Returns:
    The last logged metrics.

  Raises:
    ConfigError: the config, tokenizer or data failed a check (before anything is written).
    NonFiniteLossError: a step's loss was NaN or inf.
  """
  try:
    profile_window = profiling.parse_profile_steps(c.train.profile_steps, c.train.num_steps)
    model_cfg, loss_fn, validate, mesh, rules, tx, data_iter, heldout = _checked_setup(c)
    step_options = step_lib.compiler_options(c.train.latency_hiding, model_cfg.scan_layers, mesh)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(str(e)) from e
  report = getattr(data_iter, 'report', None)  # the data mix so far, logged at checkpoints
  tok_spec = c.data.tokenizer or c.init_from  # the tokenizer files the exported model takes
  # Only now, with the config, tokenizer and data checked, does the run write anything.
  os.makedirs(workdir, exist_ok=True)

  load_params = None
  if c.init_from:
    from flare_jax.checkpoint import model_io  # pylint: disable=g-import-not-at-top
    load_params = lambda param_shardings: model_io.load_params(c.init_from, param_shardings)
  train = state_lib.create_train_state(model_cfg, tx, mesh, rules, c.train.seed, load_params)
  manager = checkpointing.make_manager(workdir, c.ckpt.keep, c.ckpt.async_save)
  try:
    start_step, train.state, data_restarted = checkpointing.restore_latest(
        manager, train.state, data_iter, c.train.restart_data)
  except checkpointing.DataStateMismatchError as e:
    raise ConfigError(str(e)) from None
  except checkpointing.StateMismatchError as e:
    raise ConfigError(f'{e}\n{_saved_config_note(c, workdir)}') from None
  start_step = 0 if start_step is None else start_step
  if start_step:
    _log(f'resumed from {workdir}/ckpt at step {start_step}'
         + ('; its data stream was written by another number of processes, so the data starts '
            'from its beginning (train.restart_data)' if data_restarted else ''))
  _record_config(c, workdir, start_step)

  profiler = profiling.StepProfiler(profile_window, os.path.join(workdir, 'profile'), _log)
  profiler.skip_before(start_step)
  stopped_at = None
  with (jax.set_mesh(mesh), nnx.logical_axis_rules(rules),
        preemption.StopOnSigterm() as stop_signal, profiler):
    step_fn = step_lib.make_train_step(train.graphdef, train.shardings, loss_fn, c.optim.grad_accum,
                                       step_options)
    if step_options:
      _log(f'train step XLA options: {step_options} (train.latency_hiding='
           f'{c.train.latency_hiding})')
    eval_fn = step_lib.make_eval_step(train.graphdef, loss_fn) if heldout else None
    batch_sharding = jax.sharding.NamedSharding(
        mesh, shd.logical_to_pspec((shd.ACT_BATCH, shd.ACT_SEQ), rules))
    if heldout:  # on the devices once: every evaluation reads the same batches
      heldout = [_global_batch(b, batch_sharding) for b in heldout]
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    base_rng = jax.random.key(c.train.seed + 1)
    lr_schedule = optim.learning_rate_schedule(c.optim, c.train.num_steps)  # logged, not applied
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, c.train.peak_flops)
    streams = objectives.num_streams(c)
    flops_per_step = metrics_lib.train_flops_per_row(
        model_cfg, c.data.seq_len, streams) * c.data.batch_size
    last: dict[str, float] = {}
    t_last, steps_since = time.time(), 0
    end = c.train.num_steps
    if c.train.stop_after > 0:
      end = min(end, start_step + c.train.stop_after)
    for step in range(start_step, end):
      host_batch = next(data_iter)
      validate(host_batch)
      batch = _global_batch(host_batch, batch_sharding)
      done = step + 1
      if step == start_step:
        _log(f'step {done}: compiling the train step (minutes for the 0.8B+ presets), or '
             'loading it from train.compilation_cache')
      profiler.before_step(done)
      train.state, m = step_fn(train.state, batch, jax.random.fold_in(base_rng, step))
      profiler.after_step(done, (train.state, m))
      if step == start_step:  # compiles: keep it out of the throughput window
        jax.block_until_ready(m)
        _log(f'step {done}: compiled and ran in {time.time() - t_last:.1f} s')
        t_last = time.time()
      else:
        steps_since += 1
      last_step = done == end
      if not last_step and stop_signal.requested(done):  # SIGTERM: checkpoint this step, stop
        stopped_at = done
      final = last_step or stopped_at is not None
      evaluating = eval_fn is not None and (done % c.train.eval_every == 0 or final)
      if done % c.train.log_every == 0 or final or done % c.ckpt.every == 0 or evaluating:
        m = jax.device_get(m)
        if not np.isfinite(m['loss']):
          bad = os.path.join(workdir, f'nonfinite_batch_step{done}.npz')
          if jax.process_index() == 0:
            np.savez(bad, **host_batch)
          manager.wait_until_finished()
          raise NonFiniteLossError(
              f'non-finite loss {m["loss"]} at step {done}; batch saved to {bad}; last good '
              f'checkpoint: step {manager.latest_step()}')
        dt = time.time() - t_last
        last = {k: float(v) for k, v in m.items()}
        last['lr'] = float(lr_schedule(step))
        if steps_since:
          last['tokens_per_s'] = steps_since * c.data.batch_size * c.data.seq_len / dt
          last['step_time_s'] = dt / steps_since
          if peak:
            last['mfu'] = flops_per_step / (dt / steps_since) / (peak * jax.device_count())
        if evaluating:  # the same batches and noise every time: comparable across steps
          last.update(_evaluate(eval_fn, train.state, heldout, base_rng))
        writer.write(done, last)
        eta = ''
        if 'step_time_s' in last and done < c.train.num_steps:
          eta = f' eta={_duration(last["step_time_s"] * (c.train.num_steps - done))}'
        _log(f'step {done}/{c.train.num_steps} ' + ' '.join(
            f'{k}={v:.4g}' for k, v in last.items() if not k.endswith('n_targets')) + eta)
        t_last, steps_since = time.time(), 0
      if done % c.ckpt.every == 0 or final:
        checkpointing.save(manager, done, train.state, data_iter)
        if callable(report):
          _log(report())
      if stopped_at is not None:
        break
  manager.wait_until_finished()
  manager.close()
  writer.close()
  if stopped_at is not None:
    _log(f'stopped after step {stopped_at} on SIGTERM, its checkpoint saved: the same command '
         'resumes the run')
  elif end == c.train.num_steps:
    _export_model(train, workdir, tok_spec, c)
  return last


def _evaluate(eval_fn, state, heldout, base_rng) -> dict[str, float]:
  """The held-out metrics, prefixed 'eval_': token means over the held-out (device) batches."""
  rng = jax.random.fold_in(base_rng, 2**31 - 1)  # apart from every training step's noise
  outs = [eval_fn(state, b, jax.random.fold_in(rng, i)) for i, b in enumerate(heldout)]
  per_batch = [{k: float(v) for k, v in m.items()} for m in jax.device_get(outs)]
  return {f'eval_{k}': v for k, v in step_lib.mean_over_batches(per_batch).items()}


def _export_model(train: state_lib.TrainState, workdir: str, tokenizer_dir: str,
                  c: mlc.ConfigDict) -> None:
  """Writes workdir/model: params + model_config.json (+ tokenizer files) + the training record
  (objective and FLARE settings, which decoding defaults to), for sampling and export."""
  from flare_jax.checkpoint import model_io  # pylint: disable=g-import-not-at-top
  from flare_jax.sampling import training_record  # pylint: disable=g-import-not-at-top
  model, _ = nnx.merge(train.graphdef, train.state)
  out = os.path.join(workdir, 'model')
  record = training_record.make_record(
      c.objective, c.train.num_steps, c.init_from,
      model_io.load_training(c.init_from) if c.init_from else None)
  model_io.save_model(model, out,
                      tokenizer_dir=tokenizer_dir if os.path.isdir(tokenizer_dir) else None,
                      training=record, overwrite=True)
  _log(f'wrote {out} (python -m launch.sample --ckpt={out} / '
       f'python -m launch.export_hf --ckpt={out})')

