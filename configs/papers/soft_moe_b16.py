"""Soft MoE-B/16 with 128 experts (Puigcerver et al. 2024, "From Sparse to Soft Mixtures of
Experts", Table 2, long training runs).

Table 2: 3.7B parameters, 32.0 GFLOP per image. ViT-B/16 (d 768, 12 blocks, 12 heads, MLP
3,072, global average pooling) on 224 x 224 images, whose last 6 MLPs are Soft MoE layers of 128
experts with 1 slot each. Training, as the paper's released config (google-research/vmoe,
projects/soft_moe/configs/pretrain_jft4b.py): batch 4,096, 4M steps, Adam (0.9, 0.999), peak lr
1e-3 after 10k warm-up steps (then 1 / sqrt(step) with a 50k-step cool-down: cosine here), weight
decay 0.03, gradient clipping 1.0.

Data: JFT-4B (29,593 classes) is not public; imagenet2012 (1,000 classes) stands in, which shrinks
the head by 22M parameters (0.6%). Counts: every weight. Not counted, as the project's ViT has
none: the biases of attention and MLPs, and the query/key norms (~3M together).

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 11 blocks (the first 6 dense), batch 128 (52.3 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.vit(
      data=dict(name='imagenet2012', batch_size=4096),
      model=dict(patch_size=16, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
                 moe_every=1, first_dense_layers=6, activation='gelu', pool='mean',
                 dtype='bfloat16'),
      moe=dict(router='soft', num_experts=128, slots_per_expert=1, d_ff=3072,
               activation='gelu', load_balancing_coef=0.0, z_loss_coef=0.0),
      train=dict(steps=4_000_000, warmup_steps=10_000, learning_rate=1e-3, weight_decay=0.03,
                 clip_norm=1.0, end_lr_fraction=0.0),
      arg=arg)
