"""DeepSeekMoE 16B (Dai et al. 2024, "DeepSeekMoE", section 5, Table 3; released as
deepseek-ai/deepseek-moe-16b-base).

Section 5: 16.4B total, 2.8B activated parameters, 74.4T FLOPs per 4K tokens (Table 3); 28
blocks, d 2,048, 16 heads of 128; the first block's FFN dense (10,944), every other an MoE layer
of 2 shared + 64 routed experts of 1,408, 6 routed per token; vocabulary 100K (102,400 ids);
sequences of 4K, batch 4.5K sequences (18M tokens), 106,449 steps (2T tokens); AdamW (0.9, 0.95),
weight decay 0.1, lr 4.2e-4 after 2K warm-up steps (then x0.316 at 80% and 90%: cosine here),
gradient clipping 1.0; expert-level balance factor 0.001, no token dropped.

Counts: every weight, input and output embeddings (untied, 2 x 210M) included; active: the 2
shared and 6 routed experts. FLOPs per 4K tokens: the paper's are training FLOPs (forward and
backward, 3 x forward) of 4,096 tokens, attention included. Data: the paper's corpus is not
public; C4 stands in.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 2 blocks (the first dense), 64 experts, batch 8 (48.2 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.lm(
      data=dict(name='c4/en', seq_len=4096, batch_size=4608),
      model=dict(d_model=2048, num_layers=28, num_heads=16, d_ff=10944, moe_every=1,
                 first_dense_layers=1, vocab_size=102_400, dtype='bfloat16'),
      moe=dict(router='token_choice', num_experts=64, num_shared_experts=2, k=6, d_ff=1408,
               capacity_factor=None, dispatch='auto', priority='token', renormalize=False,
               load_balancing_coef=0.001, z_loss_coef=0.0),
      train=dict(steps=106_449, warmup_steps=2_000, learning_rate=4.2e-4, weight_decay=0.1,
                 clip_norm=1.0),
      arg=arg)
