"""launch.register_report (behind launch.kernel_registers): the GDN kernels' recorded launches
(jax-triton and Pallas) and ptxas reports."""
import dataclasses

import jax.numpy as jnp
import pytest

from pallas_kernels.gated_delta_rule import configs

pytest.importorskip('triton')
register_report = pytest.importorskip('launch.register_report')


def test_records_the_forward_and_backward_launches_with_their_block_sizes():
  launches = register_report.record_launches('triton', 1, 100, 2, 4, 32, 128, jnp.bfloat16, True,
                                              'NVIDIA H200')
  names = [l['kernel'].fn.__name__ for l in launches]
  assert names == ['intra_kernel', 'state_pass_kernel', 'output_kernel', 'dv_local_kernel',
                   'dhu_kernel', 'bwd_chunk_kernel']
  bs = configs.BlockSizes.get_default(128, 'NVIDIA H200', 'triton')
  by_name = dict(zip(names, launches))
  assert by_name['output_kernel']['num_warps'] == bs.num_warps_out
  assert by_name['bwd_chunk_kernel']['num_warps'] == bs.num_warps_bwd
  assert by_name['bwd_chunk_kernel']['meta']['BV'] == bs.bv_bwd
  assert by_name['intra_kernel']['meta']['HAS_SEG']
  # T=100 pads to two chunks of 64; grouped value heads (4 over 2) keep dq/dk in fp32.
  assert by_name['bwd_chunk_kernel']['grid'] == (2, 4)
  assert by_name['bwd_chunk_kernel']['dtypes'][-5:] == ['float32'] * 2 + ['bfloat16'] + [
      'float32'] * 2


def test_the_backward_state_pass_takes_its_own_launch(monkeypatch):
  """`BlockSizes.dh_launch`: the backward state pass runs at bv_dh / num_warps_dh /
  num_stages_dh where they are set, the forward's at bv / num_warps / num_stages."""
  sizes = dataclasses.replace(configs.BlockSizes.get_default(128, 'NVIDIA H200', 'triton'), bv=64,
                              num_warps=4, num_stages=3, bv_dh=16, num_warps_dh=2, num_stages_dh=1)
  monkeypatch.setattr(configs.BlockSizes, 'get_default', classmethod(lambda cls, *a: sizes))
  launches = register_report.record_launches('triton', 1, 100, 2, 2, 32, 128, jnp.bfloat16, False,
                                              'NVIDIA H200')
  by_name = {l['kernel'].fn.__name__: l for l in launches}
  launch = lambda name: (by_name[name]['meta']['BV'], by_name[name]['num_warps'],
                         by_name[name]['num_stages'], by_name[name]['grid'][0])
  assert launch('state_pass_kernel') == (64, 4, 3, 2)
  assert launch('dhu_kernel') == (16, 2, 1, 8)


def test_records_the_fused_two_stream_launches():
  record = lambda dtype, max_block: register_report.record_two_stream_launches(
      'triton', 1, 100, 2, 2, 4, 32, 40, dtype, max_block=max_block, chunk_size=64)
  names = lambda launches: [l['kernel'].fn.__name__ for l in launches]
  # The clean pass on the chunked kernels: forward (its checkpoints) and, in the backward, again
  # with the checkpoints' pullback (no output cotangent: no dv_local).
  clean_fwd = ['intra_kernel', 'state_pass_kernel']
  clean_bwd = ['dhu_kernel', 'bwd_chunk_kernel']
  # The forward stores the window rows the backward reads, so the backward's first pass is dV'.
  noisy_bwd = ['noisy_dvn_kernel', 'noisy_seed_rows_kernel', 'noisy_seed_ctx_kernel',
               'noisy_bwd_kernel']
  launches = record(jnp.float32, 20)
  assert names(launches) == clean_fwd + ['noisy_kernel'] + clean_fwd + noisy_bwd + clean_bwd
  launch = launches[2]
  # Row tiles of 32 (blocks up to 20 slots) take eight warps; V = 40 pads to one 64-wide tile;
  # windows of 64 over T = 100: two, for 1 row x 4 value heads x 2 views x 1 V tile.
  assert launch['num_warps'] == 8 and launch['meta']['S'] == 32 and launch['meta']['BV'] == 64
  assert launch['grid'] == (2, 8)
  assert launches[9]['meta']['HAS_EXT']  # dhu takes the checkpoints' cotangents
  # The backward's dV' pass and reverse walk share a grid: V tiles of 32 (two over V = 64), for
  # every dtype; the seed kernels take one program per window and head, each summing the views
  # (all of V; the context kernel: V tiles of 64).
  for dtype, max_block in ((jnp.float32, 20), (jnp.bfloat16, 20), (jnp.float32, 8)):
    launches = record(dtype, max_block)
    assert names(launches) == clean_fwd + ['noisy_kernel'] + clean_fwd + noisy_bwd + clean_bwd
    assert [launches[i]['meta']['BV'] for i in (5, 8)] == [32, 32]
    assert launches[5]['grid'] == launches[8]['grid'] == (2, 16)
    assert launches[6]['grid'] == launches[7]['grid'] == (2, 4)
  # 16-bit inputs at 16-row tiles: one V tile (all of V), the backward at eight warps; every
  # fused kernel reads noisy q, k, v as given and multiplies in bf16.
  launches = record(jnp.bfloat16, 8)
  assert [launches[i]['meta']['BV'] for i in (5, 8)] == [64, 64]
  assert launches[8]['num_warps'] == 8 and launches[8]['grid'] == (2, 8)
  for launch in launches[2:3] + launches[5:9]:
    name = launch['kernel'].fn.__name__
    read_as_given = 1 if 'seed' in name else 2 if 'dvn' in name else 3  # seed: q; dV': q, k
    assert set(launch['dtypes'][:read_as_given]) == {'bfloat16'}, name
    assert launch['meta']['PREC'].startswith('bf16')


@pytest.mark.parametrize('remat', [False, True])
def test_only_the_differentiated_forward_stores_the_window_rows(remat):
  launches = register_report.record_two_stream_launches(
      'triton', 1, 100, 2, 2, 2, 32, 32, jnp.bfloat16, max_block=4, remat=remat)
  stores = [l['meta']['STORE_ROWS'] for l in launches if l['kernel'].fn.__name__ == 'noisy_kernel']
  # Under jax.checkpoint the forward runs the primal kernel, storing nothing, and the backward
  # reruns it with the rows; without, the one forward stores them for the backward.
  assert stores == ([False, True] if remat else [True])


def test_two_stream_clean_passes_take_the_device_kinds_checkpoint_launch():
  kind = 'NVIDIA H100 80GB HBM3'
  launches = register_report.record_two_stream_launches(
      'triton', 1, 100, 2, 2, 2, 32, 128, jnp.bfloat16, max_block=4, device_kind=kind)
  by_name = {l['kernel'].fn.__name__: l for l in launches}
  bs = configs.BlockSizes.get_default(128, kind, 'triton', jnp.bfloat16, checkpoints=True)
  assert bs != configs.BlockSizes.get_default(128, '', 'triton', jnp.bfloat16, checkpoints=True)
  for name, want in (('state_pass_kernel', (bs.bv, bs.num_warps, bs.num_stages)),
                     ('dhu_kernel', bs.dh_launch())):
    launch = by_name[name]
    assert (launch['meta']['BV'], launch['num_warps'], launch['num_stages']) == want, name


def test_pallas_launches_come_from_the_cuda_lowering():
  launches = register_report.record_launches('pallas', 1, 100, 2, 4, 32, 128, jnp.bfloat16, True,
                                              'NVIDIA H200')
  names = [l['name'] for l in launches]
  assert names == ['gdr_intra', 'gdr_state_pass', 'gdr_output', 'gdr_dv_local', 'gdr_dhu',
                   'gdr_bwd_chunk']
  bs = configs.BlockSizes.get_default(128, 'NVIDIA H200', 'pallas')
  by_name = dict(zip(names, launches))
  assert by_name['gdr_bwd_chunk']['num_warps'] == bs.num_warps_bwd
  assert by_name['gdr_intra']['num_warps'] == bs.num_warps_chunk
  assert by_name['gdr_state_pass']['num_stages'] == bs.num_stages
  # Per-chunk kernels: grid (chunks, batch, value heads) = (2, 1, 4) for T=100.
  assert by_name['gdr_bwd_chunk']['grid'] == (2, 1, 4)
  assert 'tt.dot' in by_name['gdr_output']['ttir']


def test_ptxas_report_for_one_pallas_kernel():
  launches = register_report.record_launches('pallas', 1, 64, 1, 1, 16, 16, jnp.bfloat16, False,
                                              '')
  launch = [l for l in launches if l['name'] == 'gdr_dv_local'][0]
  rep = register_report.compile_report(launch, 90)
  assert 16 < rep['registers'] < 255 and rep['spill_stores'] == 0 and rep['shared_kib'] > 0


def test_attention_launches_forward_dq_and_dkdv():
  launches = register_report.record_attention_launches(1, 100, 4, 2, 64, jnp.bfloat16, '')
  assert [l['name'] for l in launches] == ['flash_attention_fwd', 'flash_attention_dq',
                                           'flash_attention_dkdv']
  # D = 64 bf16: grids (heads, row tiles); 128-row q tiles forward (T = 100 pads to 128), dk/dv
  # per key/value head.
  assert launches[0]['grid'] == (4, 1, 1) and launches[2]['grid'][0] == 2
