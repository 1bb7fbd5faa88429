"""A small MoE ViT (Soft MoE) on the 8x8 handwritten digits; trains in well under a minute on CPU.

  moe-jax train --config configs/vit_digits.py --workdir runs/vit_digits \
      [--config.moe.router=expert_choice ...]
  (on 8 devices: ... --config.mesh.data=2 --config.mesh.expert=4)

The digits ship inside scikit-learn (`moe_jax.image_datasets`); `data.data_dir=None` prepares the
TFDS files in TFDS's default data dir. 2x2 patches give 16 tokens per image, routed per image
(`group_by='sequence'`); Soft MoE with 8 experts x 2 slots has as many slots as tokens.
"""
import ml_collections
from ml_collections import config_dict

from moe_jax.spec import moe_config


def get_config() -> ml_collections.ConfigDict:
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

  # Every MoESpec field (moe_jax/spec.py documents them), defaults but for these.
  config.moe = moe_config(router='soft', d_ff=128, slots_per_expert=2, activation='gelu')

  # Device mesh (docs/parallelism.md): data * expert = the device count, or 1x1 = one device.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.expert = 1  # divides moe.num_experts; expert weights are sharded over it

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300
  config.train.learning_rate = 3e-3
  config.train.end_lr_fraction = 0.1
  config.train.warmup_steps = 30
  config.train.weight_decay = 0.1
  config.train.clip_norm = 1.0
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.eval_batches = 1  # the whole test split is one evaluation batch
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  config.train.progress = True
  return config
