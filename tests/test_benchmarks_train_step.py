"""benchmarks/train_step.py --small: the MFU benchmark runs end to end on CPU and reports sane numbers,
and its profile (--profile) names the part of the model behind nearly all of the step's time. Its
PyTorch peer (--peer torch) is our model and loss, and is tested where torch is installed."""
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'benchmarks'))
import step_profile  # noqa: E402  pylint: disable=g-import-not-at-top


def test_train_step_benchmark_small(tmp_path):
  out = tmp_path / 'train_step.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'train_step.py'), '--small', '--profile', '2',
       '--out', str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert '| small-gather' in result.stdout and '| small-blocked' in result.stdout  # the table
  for row in report['results']:
    assert 'error' not in row, row
    assert row['step_ms'] > 0 and row['tflops_executed'] >= row['tflops_useful'] > 0, row
    # 'kept' subtracts exactly the dropped assignments' routed-expert FLOPs from 'useful'
    assert 0 <= row['assignments_dropped'] <= 1, row
    case = row['config']
    routed = 3 * case['num_layers'] * case['k'] * 6 * case['d_model'] * case['d_ff'] * row[
        'tokens_per_step']
    assert abs(row['step_flops_useful'] - row['step_flops_kept']
               - routed * row['assignments_dropped']) <= 1e-6 * row['step_flops_useful'], row
    parts = row['parts']
    assert list(parts) == step_profile.ORDER, row['name']
    ms = {name: part['forward'] + part['backward'] for name, part in parts.items()}
    for name in ('attention', 'router + top-k', 'permutation', 'routed experts', 'norms',
                 'embedding, logits, loss', 'optimizer update'):
      assert ms[name] > 0, (row['name'], name, ms)
    assert parts['routed experts']['backward'] > 0 and parts['optimizer update']['backward'] == 0
    # the scopes name most kernels (counted, not timed: a share of time moves with the CPU's load)
    launches = {name: part['launches'] for name, part in parts.items()}
    assert launches[step_profile.REST] < 0.25 * sum(launches.values()), (row['name'], launches)
    perfect = row['perfect_step']  # the bound, from the dense matmul rate measured in the run
    assert perfect['dense_tflops'] > 0 and perfect['mfu_useful'] is None, perfect  # no CPU peak
    assert perfect['ms'] > ms['norms'] + ms['permutation'] + ms['router + top-k'], perfect
  assert '| routed experts |' in result.stdout and 'A perfect step: ' in result.stdout


def test_deepseek_moe_2b_shape_is_the_gpu_preset():
  """`--shapes deepseek_moe_2b` times the block of configs/papers/deepseek_moe_2b.py:scale=gpu, the
  run benchmarks/paper_scale.py trains, so the two figures compare (vocabulary aside)."""
  import train_step  # pylint: disable=g-import-not-at-top
  from configs.papers import deepseek_moe_2b  # pylint: disable=g-import-not-at-top
  config = deepseek_moe_2b.get_config('scale=gpu')
  model, moe = config.model, config.moe
  assert train_step.SHAPES['deepseek_moe_2b'] == dict(
      d_model=model.d_model, num_heads=model.num_heads, num_layers=model.num_layers,
      d_ff=moe.d_ff, num_experts=moe.num_experts, k=moe.k,
      num_shared_experts=moe.num_shared_experts)
  # what a Case fixes: every block MoE, multi-head attention, SwiGLU, token choice by sequence
  assert (model.moe_every, model.first_dense_layers, model.num_kv_heads, model.kv_lora_rank) == (
      1, 0, 0, 0)
  assert (model.activation, moe.activation, moe.router, moe.group_by, moe.priority) == (
      'swiglu', 'swiglu', 'token_choice', 'sequence', 'token')
  # `--capacity-factor none --batch 16`, and train_step's sequence length
  assert (moe.capacity_factor, config.data.batch_size, config.data.seq_len) == (None, 16, 2048)


def test_profile_reads_scopes_inside_transformations():
  """A scope inside a transformation's parentheses (`jvp(loss)`) names its part; the gradient's
  instructions (`transpose(...)`) count as backward; collectives go by opcode."""
  hlo = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %exp.1 = f32[4]{0} exponential(%param_0), metadata={op_name="jit(step)/jvp(loss)/exp"}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %fusion = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation
  %dot.2 = f32[4]{0} multiply(%fusion, %p), metadata={op_name="jit(step)/transpose(jvp(Transformer))/block_0/moe/experts/mul"}
  ROOT %all-reduce-start = f32[4]{0} all-reduce-start(%dot.2), replica_groups={}, metadata={op_name="jit(step)/optimizer/psum"}
}
"""
  table = step_profile.instructions(hlo)
  assert step_profile.part_of(table['fusion']) == 'embedding, logits, loss'
  assert step_profile.direction_of(table['fusion']) == 'forward'
  assert step_profile.part_of(table['dot.2']) == 'routed experts'
  assert step_profile.direction_of(table['dot.2']) == 'backward'
  assert step_profile.part_of(table['all-reduce-start']) == step_profile.COLLECTIVE
  assert step_profile.part_of(None) == step_profile.UNNAMED


def test_optimizer_floor_is_its_bytes_at_the_hbm_bandwidth():
  """2.352B parameters (the DeepSeek-like shape) x 28 bytes at an H100's 3.35 TB/s: 19.7 ms."""
  floor = step_profile.optimizer_floor_ms(2_352_000_000, 'NVIDIA H100 80GB HBM3')
  assert abs(floor - 2.352e9 * 28 / 3.35e12 * 1e3) < 1e-9 and 19 < floor < 20
  assert step_profile.optimizer_floor_ms(10, 'cpu') is None
  parts = {name: {'forward': 1.0, 'backward': 0.0, 'kernels': {}} for name in step_profile.ORDER}
  assert 'floor at HBM bandwidth (28 bytes per parameter): 2.00 ms; measured 1.00 ms' in (
      step_profile.markdown('x', parts, 5.0, 2.0))


def test_perfect_step_by_hand():
  """The DeepSeek-like step's profile (H100, docs/performance.md): its 35.6 TFLOP of useful work at
  798 TFLOP/s, the update at its 19.7 ms floor, norms, permutation and router as measured."""
  measured = {'routed experts': (14.4, 24.1), 'optimizer update': (22.2, 0.0),
              'attention': (4.6, 10.3), 'shared experts': (3.4, 6.8), 'norms': (1.5, 2.3),
              'permutation': (2.0, 0.6), 'router + top-k': (0.5, 0.4),
              'embedding, logits, loss': (0.1, 0.2)}
  parts = {name: {'forward': measured.get(name, (0.0, 0.0))[0],
                  'backward': measured.get(name, (0.0, 0.0))[1], 'kernels': {}}
           for name in step_profile.ORDER}
  perfect = step_profile.perfect_step(parts, 35.6e12, 798.0, 19.7, 989.0)
  by_hand = 1e3 * 35.6 / 798 + 19.7 + (1.5 + 2.3) + (2.0 + 0.6) + (0.5 + 0.4)
  assert perfect.ms == pytest.approx(by_hand) and 71 < by_hand < 72
  assert perfect.mfu_useful == pytest.approx(35.6e12 / (by_hand * 1e-3) / 989e12)  # 50.3%
  assert step_profile.perfect_step(parts, 35.6e12, 798.0, None, 989.0).ms == pytest.approx(
      by_hand - 19.7 + 22.2)  # no floor known: the update as measured
  assert 'A perfect step: ' in step_profile.markdown('x', parts, 96.3, 19.7, perfect)


# The PyTorch peer (`--peer torch`, benchmarks/torch_peer.py): these run where torch is installed.

def _tiny_case():
  import train_step  # pylint: disable=g-import-not-at-top
  return train_step, train_step.Case('tiny', d_model=32, num_layers=2, num_heads=4, d_ff=16,
                                     batch_size=2, seq_len=16, dispatch='gather', num_experts=4,
                                     k=2, capacity_factor=None, num_shared_experts=1)


def test_torch_peer_is_our_model_and_learns_a_repeated_batch():
  """The peer has exactly our parameter count, and its step (eager, on CPU) drives the loss of one
  repeated batch down from ~ln 256."""
  pytest.importorskip('torch')
  import torch_peer  # pylint: disable=g-import-not-at-top
  train_step, case = _tiny_case()
  hyper = {**train_step.peer_hyper(case), 'learning_rate': 1e-2}
  result = torch_peer.run_torch_case(case, 1, 5, hyper, compile_model=False, device='cpu')
  assert result['params'] == case.params()[0]
  assert not result['compiled'] and result['grouped_mm'] in torch_peer.GROUPED_MMS
  losses = result['losses']
  assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
  assert abs(losses[0] - math.log(256)) < 1.0 and losses[-1] < losses[0] - 1.0, losses
  assert len(result['step_ms_all']) == 5 and result['step_ms'] > 0


def test_torch_peer_experts_match_a_dense_reference():
  """Sorting the slots by expert and running them by grouped matmul (each implementation that runs
  here; expert 3 gets no slot) gives each token the weighted sum of its k experts' SwiGLU outputs,
  computed densely over all experts."""
  torch = pytest.importorskip('torch')
  import torch_peer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  t, d, f, e, k = 24, 16, 8, 4, 2
  x = torch.randn(t, d).to(torch.bfloat16)
  index = torch.stack([torch.randperm(e - 1)[:k] for _ in range(t)])  # [T, k], distinct experts
  weight = torch.rand(t, k)
  matmuls = {'loop', torch_peer.pick_grouped_mm(torch.device('cpu'))}
  for matmul in sorted(matmuls):
    moe = torch_peer.MoE(d, f, e, k, 0, None, matmul)
    with torch.no_grad():
      got = moe.experts(x, index, weight).float()
      w_gate, w_in, w_out = (w.to(torch.bfloat16).float()
                             for w in (moe.w_gate, moe.w_in, moe.w_out))
      h = (torch.nn.functional.silu(torch.einsum('td,edf->etf', x.float(), w_gate))
           * torch.einsum('td,edf->etf', x.float(), w_in))
      every = torch.einsum('etf,efd->etd', h, w_out)  # [E, T, d]
      want = (every[index, torch.arange(t)[:, None]] * weight[..., None]).sum(1)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()),
                               msg=matmul)


def test_torch_peer_aux_loss_is_ours():
  """The peer's weighted aux loss equals ours: the Switch loss of each sequence averaged, and the
  z-loss (`moe_jax.routing.losses`), with MoESpec's weights."""
  torch = pytest.importorskip('torch')
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch_peer  # pylint: disable=g-import-not-at-top
  from moe_jax.routing import losses  # pylint: disable=g-import-not-at-top
  train_step, case = _tiny_case()
  hyper = train_step.peer_hyper(case)
  logits = torch.randn(3, 10, 4)
  probs = logits.softmax(-1)
  index = probs.topk(2, dim=-1).indices
  moe = torch_peer.MoE(8, 8, 4, 2, 0, torch_peer.Hyper(**hyper), 'loop')
  got = float(moe.aux_loss(logits, probs, index))
  p, i, lg = np.asarray(probs), np.asarray(index), np.asarray(logits)
  balance = np.mean([losses.load_balancing_loss(p[b], i[b]) for b in range(3)])
  z = losses.z_loss(lg.reshape(-1, 4))
  want = hyper['load_balancing_coef'] * balance + hyper['z_loss_coef'] * float(z)
  assert abs(got - want) < 1e-5 * abs(want), (got, want)


def test_train_step_peer_column(tmp_path):
  """--small --peer torch: each row gets the peer's step time (one run for both dispatches, which
  are the same model to the peer), and the table its column."""
  pytest.importorskip('torch')
  out = tmp_path / 'train_step.json'
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'train_step.py'), '--small', '--peer', 'torch',
       '--peer-eager', '--out', str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())['results']
  assert len(rows) == 2 and rows[0]['peer'] == rows[1]['peer'], rows
  peer = rows[0]['peer']
  assert peer['step_ms'] > 0 and not peer['compiled'] and peer['mfu_useful'] is None  # CPU
  assert peer['params'] == rows[0]['params_total']
  assert '| torch step ms / useful MFU |' in result.stdout
  assert result.stdout.count(', eager |') == 2


def test_train_step_peer_without_its_package_exits_2():
  """--peer torch where torch is not installed: status 2 and one line, before anything runs."""
  if importlib.util.find_spec('torch') is not None:
    pytest.skip('torch is installed here')
  result = subprocess.run(
      [sys.executable, str(ROOT / 'benchmarks' / 'train_step.py'), '--small', '--peer', 'torch'],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'torch' in lines[0] and 'not installed' in lines[0], lines
  assert result.stdout == ''
