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

Presets (`--config configs/papers/<name>.py:scale=cpu` or `:scale=gpu`, `common.cpu_scale` and
`common.gpu_scale`, the same rules for every config):

  scale=cpu  the model's family at a test's size: the same routing (router, k, capacity factor or
             dropless, shared experts, expert groups, bias), attention kind, encoder-decoder or
             not, dense first blocks, tied embeddings and activation; d 64, 2 heads, at most 8
             experts, the fewest blocks that keep an MoE block; Tiny Shakespeare bytes or the 8x8
             digits, float32, 3 steps (tests/test_paper_presets.py trains every one).
  scale=gpu  the largest member of the family that trains on one 80 GB GPU by `moe-jax plan`'s
             count: widths and routing kept, bf16, one device, a per-device batch, then fewer
             blocks, fewer experts, a smaller batch, a smaller vocabulary, shorter sequences, in
             that order, until it fits; the paper's data name (bring it, or
             `--config.data.name=english_mix`, offline, for a first run).

  scale=gpu reduces (planned GiB on one H100; a preset plans for at most 75% of its 80 GB):
    t5_base           batch 16 (6.1)           t5_large        batch 16 (17.4)
    switch_base       6 + 6 blocks (50.5)      switch_large    4 + 4 blocks (59.4)
    gshard_top2       2 blocks, 4 experts, batch 8 (42.5); expert_choice the same (42.5)
    soft_moe_b16      11 blocks (6 dense), batch 128 (52.3)
    deepseek_moe_2b   all 9 blocks, batch 16 (59.5)
    deepseek_moe_16b  2 blocks (1 dense), 64 experts, batch 8 (48.2)
    mixtral_8x7b      1 block, 8 experts, batch 8 (40.2)
    deepseek_v3       2 blocks (1 dense), 16 experts, batch 1 of 2,048 tokens, vocabulary 32,768
                      (38.3)

The data sets are stock TFDS names (`c4/en`, `imagenet2012`) standing in where a paper's own data
is not public. Text is tokenized as bytes by default, so a model's vocabulary rows beyond 256 are
counted (as the paper's) but unused in training; `moe-jax tokenizer` trains a SentencePiece model,
and `--config.data.tokenizer=PATH/tokenizer.model` then streams the tokenized text through Grain
(per-host shards of TFDS's array_record files) instead of reading it into memory. Images are
still read into memory: ImageNet needs a streaming image pipeline (not in the project yet).
`moe-jax plan` sizes the full runs.
"""
