"""DeepSeekMoE 2B (Dai et al. 2024, "DeepSeekMoE", section 4.1, Table 1).

Section 4.1: ~2.0B total, ~0.3B activated parameters; 9 blocks, d 1,280, 10 heads of 128, every
FFN an MoE layer whose experts total 16 standard FFNs: 1 shared + 63 routed experts of a quarter
FFN each, 7 routed per token (2 FFNs activated, shared included); BPE vocabulary of 8K;
sequences of 2K, batch 2K sequences (4M tokens), 25,000 steps (100B tokens); AdamW (0.9, 0.95),
weight decay 0.1, lr 1.08e-3 after 2K warm-up steps (then x0.316 at 80% and 90% of training:
cosine here), gradient clipping 1.0; expert-level balance factor 0.01.

The paper does not give the standard FFN's width: a quarter FFN of 880 here (DeepSeekMoE 16B's
ratio, FFN = 2.75 d), which gives 2.03B. Counts: every weight, input and output embeddings
(untied) included; active: the shared and 7 routed experts. Data: the paper's corpus is not
public; C4 stands in.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: all 9 blocks, batch 16 (59.5 GiB planned; 56.2 GiB measured on an H100,
README).
"""
from configs.papers import common


def get_config(arg=None):
  return common.lm(
      data=dict(name='c4/en', seq_len=2048, batch_size=2048),
      model=dict(d_model=1280, num_layers=9, num_heads=10, d_ff=3520, moe_every=1,
                 vocab_size=8192, dtype='bfloat16'),
      moe=dict(router='token_choice', num_experts=63, num_shared_experts=1, k=7, d_ff=880,
               capacity_factor=None, dispatch='auto', priority='token', renormalize=False,
               load_balancing_coef=0.01, z_loss_coef=0.0),
      train=dict(steps=25_000, warmup_steps=2_000, learning_rate=1.08e-3, weight_decay=0.1,
                 clip_norm=1.0),
      arg=arg)
