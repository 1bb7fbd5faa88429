"""A small MoE ViT (Soft MoE) on the 8x8 handwritten digits; trains in well under a minute on CPU.

  moe-jax train --config configs/vit_digits.py --workdir runs/vit_digits \
      [--config.moe.router=expert_choice ...]
  (on 8 devices: ... --config.mesh.data=2 --config.mesh.expert=4)

Presets (`--config configs/vit_digits.py:ARG`, comma-separated): `dropless`, token choice without
a capacity (moe.capacity_factor=None, with --config.moe.router=token_choice); `scale=cpu` or
`scale=gpu`, the ViT of the paper claims (experiments/) at that scale (`at_scale`).

The digits ship inside scikit-learn (`moe_jax.data.images`); `data.data_dir=None` prepares the
TFDS files in TFDS's default data dir. 2x2 patches give 16 tokens per image, routed per image
(`group_by='sequence'`); Soft MoE with 8 experts x 2 slots has as many slots as tokens.
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from moe_jax.moe.spec import moe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.deterministic = False  # XLA:GPU deterministic ops (moe_jax/reproducibility.py)

  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'
  config.data.manual_dir = config_dict.placeholder(str)
  config.data.data_dir = config_dict.placeholder(str)
  config.data.batch_size = 64

  config.model = ml_collections.ConfigDict()
  config.model.patch_size = 2
  config.model.d_model = 64
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.d_ff = 128  # dense FFN width
  config.model.moe_every = 2  # blocks 1 and 3 are MoE; 0 = dense
  config.model.activation = 'gelu'
  config.model.pool = 'mean'
  config.model.dtype = 'float32'
  config.model.remat = 'none'  # per block: 'full' or a jax.checkpoint_policies name saves memory

  # Every MoESpec field (moe_jax/moe/spec.py documents them), defaults but for these.
  config.moe = moe_config(router='soft', d_ff=128, slots_per_expert=2, activation='gelu')

  config.mesh = common.mesh()
  config.train = common.train(eval_batches=1)  # the whole test split is one evaluation batch
  return common.with_presets(config, arg, at_scale)


def at_scale(config: ml_collections.ConfigDict, scale: str) -> None:
  """The paper claims' ViT at `scale` (`common.SCALES`), an MoE FFN in every second block: on the
  8x8 digits with 2x2 patches (cpu, 16 tokens) or on Fashion-MNIST with 4x4 patches (gpu, 49
  tokens)."""
  common.check_scale(scale)
  config.deterministic = True
  if scale == 'cpu':
    config.data.batch_size = 64
    config.model.update(patch_size=2, d_model=64, num_layers=4, num_heads=4, d_ff=128)
    config.train.update(steps=300, warmup_steps=20, learning_rate=3e-3, log_every=10,
                        eval_every=100)
  else:
    config.data.update(name='fashion_mnist', batch_size=128)
    config.model.update(patch_size=4, d_model=128, num_layers=4, num_heads=4, d_ff=512)
    config.moe.update(slots_per_expert=6)  # 8 experts x 6 slots for 49 tokens per image
    # 1,000 x 128 images = 2.1 epochs of the 60,000 training images (the digits, 1,437 images,
    # were memorized within 250 steps: experiments/README.md).
    config.train.update(steps=1000, warmup_steps=50, learning_rate=1e-3, log_every=10,
                        eval_every=250, eval_batches=10)  # the 10,000 test images in 10 batches
  config.train.update(checkpoint_every=0, progress=False)
