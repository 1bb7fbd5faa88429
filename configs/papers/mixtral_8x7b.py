"""Mixtral 8x7B (Jiang et al. 2024, "Mixtral of Experts", Table 1 and section 2).

Table 1: d 4,096, 32 blocks, 32 query heads of 128 and 8 key/value heads (grouped-query), SwiGLU
FFNs of 14,336, 8 experts in every block, top-2, vocabulary 32,000, context 32,768. Section 2:
47B parameters, 13B active per token. Routing: softmax over the two selected logits, no token
dropped (MegaBlocks).

Counts: every weight, input and output embeddings (untied, 2 x 131M) included; active: two
experts per token. Not stated by the paper, and ours: data (C4 stands in), sequence length
(4,096), batch (1,024 sequences: 4M tokens), steps and optimizer (AdamW, lr 3e-4).

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 1 block, 8 experts, batch 8 (40.2 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.lm(
      data=dict(name='c4/en', seq_len=4096, batch_size=1024),
      model=dict(d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                 moe_every=1, vocab_size=32_000, rope_base=1e6, dtype='bfloat16'),
      moe=dict(router='token_choice', num_experts=8, k=2, d_ff=14336, capacity_factor=None,
               dispatch='auto', priority='token', renormalize=True, load_balancing_coef=0.01,
               z_loss_coef=0.0),
      train=dict(steps=250_000, warmup_steps=2_000, learning_rate=3e-4, weight_decay=0.1,
                 clip_norm=1.0),
      arg=arg)
