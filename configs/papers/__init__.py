"""Paper-scale configs: the headline models of the papers the project reproduces.

  moe-jax plan  --config configs/papers/switch_base.py --config.mesh.data=32 --config.mesh.expert=8
  moe-jax train --config configs/papers/switch_base.py --workdir DIR --config.mesh.data=... (a pod)

One module per model, each a normal `get_config()` config whose docstring cites the table it comes
from and says what its counts include; `common.py` holds what they share.
`tests/test_paper_configs.py` checks each model's total and active parameters (and FLOPs, where
the paper gives them) against the paper, counted by the project's own code.

  t5_base, t5_large          T5 v1.0 baselines of Switch (Fedus et al. 2022, Table 9)
  switch_base, switch_large  Switch-Base/Large, 128 experts (Fedus et al. 2022, Table 9)
  gshard_top2                GLaM 8B/64E routed top-2 as GShard (Zhou et al. 2022, Table 1)
  expert_choice              the same, expert choice with capacity factor 2 (Zhou et al. 2022)
  soft_moe_b16               Soft MoE-B/16, 128 experts (Puigcerver et al. 2024, Table 2)
  deepseek_moe_2b            DeepSeekMoE 2B (Dai et al. 2024, section 4)
  deepseek_moe_16b           DeepSeekMoE 16B (Dai et al. 2024, section 5)
  mixtral_8x7b               Mixtral 8x7B (Jiang et al. 2024, Table 1)
  deepseek_v3                DeepSeek-V3 (DeepSeek-AI 2024, section 4.2)

The data sets are stock TFDS names (`c4/en`, `imagenet2012`) standing in where a paper's own data
is not public; the project tokenizes text as bytes, so a model's vocabulary rows beyond 256 are
counted (as the paper's) but unused in training. The project's loaders read a data set into
memory, which suits neither C4 nor ImageNet: `moe-jax plan` sizes these runs, and training them
needs a streaming input pipeline (not in the project yet).
"""
