"""Model checkpoints: orbax params + config round trip, sharded restore, overrides, atomicity."""
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from flare_jax import sharding as shd
from flare_jax.checkpoint import model_io
from flare_jax.model import config as config_lib
from flare_jax.model import transformer

L, F = config_lib.LINEAR, config_lib.FULL


def _cfg(**kw):
  return config_lib.VARIANTS['tiny'].replace(**{'dtype': 'float32', 'layer_types': (L, F), **kw})


def _np_params(model_or_params):
  return jax.tree.map(np.asarray, model_io.params_of(model_or_params))


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, x), y in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


_forward = nnx.jit(lambda m, t: m(t)[0])


def _logits(model, tokens):
  with jax.default_matmul_precision('highest'):
    return np.asarray(_forward(model, tokens))


def test_save_load_round_trip_gives_same_params_and_logits(tmp_path):
  cfg = _cfg(tie_word_embeddings=False, mask_token_id=3)
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(1))
  (tmp_path / 'tok').mkdir()
  (tmp_path / 'tok' / 'tokenizer.json').write_text('{}')
  (tmp_path / 'notes.txt').write_text('hello')
  model_io.save_model(model, str(tmp_path / 'ckpt'), tokenizer_dir=str(tmp_path / 'tok'),
                      extra_files=[str(tmp_path / 'notes.txt')])
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['model_config.json', 'notes.txt', 'params',
                                                   'tokenizer.json']
  assert model_io.load_config(str(tmp_path / 'ckpt')) == cfg
  loaded = model_io.load_model(str(tmp_path / 'ckpt'))
  assert loaded.cfg == cfg
  _assert_trees_equal(_np_params(loaded), _np_params(model))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
  np.testing.assert_array_equal(_logits(loaded, tokens), _logits(model, tokens))


def test_params_or_state_need_a_config(tmp_path):
  cfg = _cfg()
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='needs cfg='):
    model_io.save_model(nnx.state(model, nnx.Param), str(tmp_path / 'a'))
  model_io.save_model(nnx.state(model, nnx.Param), str(tmp_path / 'a'), cfg=cfg)
  model_io.save_model(_np_params(model), str(tmp_path / 'b'), cfg=cfg)
  for d in ('a', 'b'):
    _assert_trees_equal(model_io.load_params(str(tmp_path / d)), _np_params(model))


def test_restore_lands_on_the_requested_shardings(tmp_path, cpu_mesh):
  cfg = _cfg()
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  model_io.save_model(model, str(tmp_path / 'ckpt'))
  with jax.set_mesh(cpu_mesh), nnx.logical_axis_rules(shd.DEFAULT_RULES):
    abstract = nnx.eval_shape(lambda: transformer.FlareLM(cfg, rngs=nnx.Rngs(0)))
    pspecs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
  shardings = nnx.to_pure_dict(jax.tree.map(
      lambda p: jax.sharding.NamedSharding(cpu_mesh, p), pspecs,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  restored = model_io.load_params(str(tmp_path / 'ckpt'), shardings)
  n_split = 0
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)
    n_split += not x.sharding.is_fully_replicated
  assert n_split >= 5  # the test means something only if some leaves are really split
  _assert_trees_equal(restored, _np_params(model))
  loaded = model_io.load_model(str(tmp_path / 'ckpt'), shardings=shardings)
  kernel = loaded.layers[0].mlp.up_proj.kernel[...]
  want = shardings['layers'][0]['mlp']['up_proj']['kernel']
  assert kernel.sharding.is_equivalent_to(want, 2) and not kernel.sharding.is_fully_replicated


def test_overrides_cast_dtypes_but_cannot_change_shapes(tmp_path):
  cfg = _cfg()
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  model_io.save_model(model, str(tmp_path / 'ckpt'))
  loaded = model_io.load_model(str(tmp_path / 'ckpt'), overrides={'param_dtype': 'bfloat16'},
                               dtype='bfloat16')
  assert (loaded.cfg.param_dtype, loaded.cfg.dtype) == ('bfloat16', 'bfloat16')
  got = loaded.layers[1].self_attn.q_proj.kernel[...]
  want = np.asarray(model.layers[1].self_attn.q_proj.kernel[...])
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got), want.astype(ml_dtypes.bfloat16))
  with pytest.raises(ValueError, match=r"change parameter shapes: \['embed_tokens'\]"):
    model_io.load_model(str(tmp_path / 'ckpt'), hidden_size=32)


def test_writes_are_atomic_and_never_clobber(tmp_path):
  cfg = _cfg()
  model = transformer.FlareLM(cfg, rngs=nnx.Rngs(0))
  out = tmp_path / 'ckpt'
  out.mkdir()
  (out / 'keep').write_text('x')
  with pytest.raises(ValueError, match='exists and is not empty'):
    model_io.save_model(model, str(out))
  with pytest.raises(ValueError, match='extra files not found'):
    model_io.save_model(model, str(out), overwrite=True, extra_files=[str(tmp_path / 'nope')])
  with pytest.raises(RuntimeError, match='boom'):
    with model_io.atomic_output_dir(str(out), overwrite=True) as tmp:
      open(os.path.join(tmp, 'partial'), 'w').close()
      raise RuntimeError('boom')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']  # no temp dir left behind
  assert os.listdir(out) == ['keep']
  model_io.save_model(model, str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ['model_config.json', 'params']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']
  with pytest.raises(ValueError, match='not a model checkpoint'):
    model_io.load_model(str(tmp_path))


def test_a_directory_that_is_no_checkpoint_says_what_it_is(tmp_path):
  """load_config's error names what the directory looks like and where the model is."""
  cases = {'missing': 'no such directory', 'empty': 'convert Hugging Face weights',
           'workdir': f'a training workdir: its model is {tmp_path / "workdir" / "model"}',
           'unfinished': 'a training workdir whose run has not finished',
           'hf': 'a Hugging Face checkpoint? convert it first: python -m launch.convert_hf '
                 f'--hf_dir={tmp_path / "hf"}'}
  for name in ('empty', 'unfinished/ckpt', 'workdir/model', 'hf'):
    os.makedirs(tmp_path / name)
  (tmp_path / 'workdir' / 'model' / model_io.CONFIG_FILE).write_text('{}')
  (tmp_path / 'hf' / 'config.json').write_text('{}')
  (tmp_path / 'hf' / 'model.safetensors').write_bytes(b'')
  for name, hint in cases.items():
    with pytest.raises(ValueError) as err:
      model_io.load_config(str(tmp_path / name))
    assert hint in str(err.value), name
