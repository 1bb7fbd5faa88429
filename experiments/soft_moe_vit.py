"""Claim (f): Soft MoE beats sparse token-choice and expert-choice routers on a ViT at equal FLOPs.

  python -m experiments run --claims f --scale cpu --workdir runs/claims
  moe-jax sweep --config experiments/soft_moe_vit.py:scale=cpu --workdir runs/soft_moe_vit   (its runs, no verdict)

A ViT classifier (`moe_jax.models.vit`), every second block MoE with 8 experts, each image's
tokens routed together: on Fashion-MNIST (60,000 train / 10,000 test 28x28 images, 4x4 patches:
49 tokens, 8 x 6 Soft MoE slots) at gpu scale, on the 8x8 digits scikit-learn ships (16 tokens,
8 x 2 slots) at cpu scale. Token choice is top-2 (capacity factor 1.25), expert choice capacity
factor 2. All are sized to the dense FFN's *executed* FLOPs (capacity padding counts), the
convention of the Soft MoE paper, which compares routers at equal training cost. Metric: test-split
cross-entropy (accuracy is shown too). A ViT is not causal: every router may see the whole image.
"""
from experiments import common

STATEMENT = ('Soft MoE beats sparse token-choice (top-2) and expert-choice routers on a ViT at '
             'equal FLOPs per token (lower test loss).')
SOURCE = 'Puigcerver et al. 2023, From Sparse to Soft Mixtures of Experts (sec. 3, fig. 3)'
# Why this table cannot test the claim (experiments/PROTOCOL.md): the paper's gains are for ViTs
# of S/16 and larger with 32-256 experts trained on JFT-4B for 300k+ steps; the largest image set
# available offline here is Fashion-MNIST (60,000 28x28 grey images), on which 8-expert ViTs of
# ~1M parameters saturate within a few epochs.
NOT_AT_PAPER_SCALE = ('not tested at the paper\'s scale: its gains are for ViT-S/16 and larger '
                      'with 32-256 experts on JFT-4B; offline data here stops at Fashion-MNIST.')


MEMBERS = {
    'soft_moe': {'moe': {'router': 'soft'}},
    'token_choice_top2': {'moe': {'router': 'token_choice', 'k': 2, 'capacity_factor': 1.25}},
    'expert_choice': {'moe': {'router': 'expert_choice', 'capacity_factor': 2.0}},
}


# The paired differences (member, baseline, metric) the verdict tests, each claimed < its margin.
COMPARISONS = [('soft_moe', 'token_choice_top2', 'eval_loss'), ('soft_moe', 'expert_choice', 'eval_loss')]

def get_config(arg: str | None = None):
  scale = common.scale_of(arg)
  return common.sweep_config('vit', scale, MEMBERS, flops_match='executed',
                             seeds=range(3) if scale == 'cpu' else range(4))


def verdict(results) -> common.Verdict:
  tests = [common.compare_lower(results, 'soft_moe', other, 'eval_loss', what='test loss')
           for other in ('token_choice_top2', 'expert_choice')]
  return common.Verdict('not tested', NOT_AT_PAPER_SCALE + ' Measured here: ' + '; '.join(
      test.line for test in tests),
                        common.member_rows(results, [('eval_loss', 'test loss', 4),
                                                     ('eval_accuracy', 'test accuracy', 3),
                                                     ('dropped', 'dropped', 3)]))
