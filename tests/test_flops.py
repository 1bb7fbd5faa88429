"""FLOP and parameter counts against hand-computed cases; equal-FLOPs sizing and its check."""
import pytest

from moe_jax.moe import flops
from moe_jax.moe.spec import MoESpec

D = 64
SHAPE = flops.Shape(batch_size=8, seq_len=32)


def test_dense_ffn():
  assert flops.ffn_flops(D, 256) == 2 * 64 * 256 * 3  # SwiGLU: in, gate, out
  assert flops.ffn_flops(D, 256, 'gelu') == 2 * 64 * 256 * 2


def test_switch_counts_capacity_padding():
  spec = MoESpec(num_experts=8, d_ff=256, k=1, capacity_factor=1.25)  # groups of 32 tokens
  capacity = 5  # round(32 * 1.25 / 8) = round(5.0)
  expected = 2 * D * 8 + (8 * capacity / 32) * (2 * D * 256 * 3)
  assert flops.moe_flops(spec, D, SHAPE) == pytest.approx(expected)


def test_top2_and_dropless():
  spec = MoESpec(num_experts=8, d_ff=128, k=2, capacity_factor=1.0)
  assert flops.expert_slots_per_token(spec, SHAPE) == 2.0  # round(2 * 32 / 8) = 8 slots * 8 / 32
  dropless = spec.replace(capacity_factor=None)
  assert flops.moe_flops(dropless, D, SHAPE) == pytest.approx(2 * D * 8 + 2 * (2 * D * 128 * 3))


def test_expert_choice_by_position_groups():
  spec = MoESpec(router='expert_choice', num_experts=4, d_ff=128, capacity_factor=2.0,
                 group_by='position')  # groups of batch_size = 8 tokens, C = round(8*2/4) = 4
  assert flops.expert_slots_per_token(spec, SHAPE) == 4 * 4 / 8


def test_soft_moe_counts_dispatch_and_combine():
  spec = MoESpec(router='soft', num_experts=4, slots_per_expert=2, d_ff=128, group_by='position')
  slots = 4 * 2
  expected = 3 * (2 * D * slots) + (slots / 8) * (2 * D * 128 * 3)
  assert flops.moe_flops(spec, D, SHAPE) == pytest.approx(expected)


def test_shared_experts_and_params():
  spec = MoESpec(num_experts=16, d_ff=32, k=4, capacity_factor=None, num_shared_experts=2)
  per_expert = 3 * D * 32
  total, active = flops.moe_params(spec, D, SHAPE)
  assert total == D * 16 + 2 * per_expert + 16 * per_expert
  assert active == D * 16 + 2 * per_expert + 4 * per_expert
  assert flops.moe_flops(spec, D, SHAPE) == pytest.approx(2 * D * 16 + 6 * 2 * per_expert)


@pytest.mark.parametrize('spec', [
    MoESpec(num_experts=8, k=1, capacity_factor=1.25),
    MoESpec(num_experts=8, k=2, capacity_factor=1.25),
    MoESpec(router='expert_choice', num_experts=8, capacity_factor=2.0, group_by='position'),
    MoESpec(router='soft', num_experts=8, slots_per_expert=1, group_by='position'),
    MoESpec(num_experts=32, k=8, capacity_factor=1.25, num_shared_experts=2),
    MoESpec(num_experts=8, k=2, capacity_factor=None, score='sigmoid', bias_update_rate=1e-3),
])
def test_size_to_budget_hits_the_dense_budget(spec):
  budget = flops.ffn_flops(D, 256)
  sized = flops.size_to_budget(spec, D, SHAPE, budget)
  achieved = flops.moe_flops(sized, D, SHAPE)
  per_unit = flops.moe_flops(sized.replace(d_ff=sized.d_ff + 1), D, SHAPE) - achieved
  assert abs(achieved - budget) <= per_unit / 2 + 1e-9  # the closest integer width


def test_size_to_budget_rejects_impossible_budget():
  spec = MoESpec(router='soft', num_experts=64, slots_per_expert=4, group_by='position')
  with pytest.raises(ValueError, match='cannot fit this MoE layer'):
    flops.size_to_budget(spec, D, SHAPE, budget=1000.0)


def test_check_equal_flops_names_the_unequal_member():
  flops.check_equal_flops({'dense': 100.0, 'switch': 101.0}, budget=100.0, tolerance=0.02)
  with pytest.raises(ValueError, match=r'top2: 130 FLOPs/token \(\+30.0%\)'):
    flops.check_equal_flops({'dense': 100.0, 'top2': 130.0}, budget=100.0, tolerance=0.02)
