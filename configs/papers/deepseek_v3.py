"""DeepSeek-V3 (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", sections 2 and 4.2).

Section 4.2: 671B total, 37B activated parameters per token. 61 blocks of d 7,168; multi-head
latent attention, 128 heads, head size 128 plus 64 RoPE dims, query latent 1,536, key/value
latent 512; the first 3 FFNs dense (18,432), the rest MoE: 1 shared + 256 routed experts of
2,048, 8 routed per token, sigmoid affinities normalized over the selected ones, auxiliary-loss-
free balancing (bias update speed 0.001) plus a sequence-wise balance loss (0.0001), no token
dropped; vocabulary 129,280. Training: 14.8T tokens of 4K sequences, batch growing from 3,072 to
15,360 sequences (15,360 here), AdamW (0.9, 0.95), weight decay 0.1, lr 2.2e-4 after 2K warm-up
steps down to 2.2e-5 (cosine here), gradient clipping 1.0; steps: 14.8T / (15,360 x 4,096) ~ 235k.

Counts: every weight of the main model, input and output embeddings (untied, 2 x 927M) included.
Not counted, as in the paper's 671B: the multi-token-prediction module (14B), which the project
does not have. Routing as the paper: node-limited to 4 of 8 expert groups per token
(`num_expert_groups`, `groups_per_token`, scored by the sum of each group's top-2 affinities) and
the sequence-wise balance loss (`balance_over='sequence'`). Not modelled: the 2.5 scaling of routed
outputs. Data: the paper's corpus is not public; C4 stands in.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 2 blocks (the first dense), 16 experts, batch 1 of 2,048 tokens, vocabulary
32,768 (38.3 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.lm(
      data=dict(name='c4/en', seq_len=4096, batch_size=15_360),
      model=dict(d_model=7168, num_layers=61, num_heads=128, head_dim=128, rope_head_dim=64,
                 q_lora_rank=1536, kv_lora_rank=512, d_ff=18432, moe_every=1,
                 first_dense_layers=3, vocab_size=129_280, dtype='bfloat16'),
      moe=dict(router='token_choice', num_experts=256, num_shared_experts=1, k=8, d_ff=2048,
               capacity_factor=None, dispatch='auto', priority='token', score='sigmoid',
               renormalize=True, bias_update_rate=1e-3, load_balancing_coef=1e-4,
               balance_over='sequence', num_expert_groups=8, groups_per_token=4,
               z_loss_coef=0.0),
      train=dict(steps=235_000, warmup_steps=2_000, learning_rate=2.2e-4, weight_decay=0.1,
                 clip_norm=1.0),
      arg=arg)
