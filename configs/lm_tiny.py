"""A small byte-level MoE LM on Tiny Shakespeare that trains in about a minute on 2 CPU cores.

  moe-jax train --config configs/lm_tiny.py --workdir runs/lm_tiny [--config.model.d_model=64 ...]
  (on 8 devices: ... --config.mesh.data=2 --config.mesh.expert=4)

`data.data_dir=None` prepares and reads TFDS files in TFDS's default data dir
($TFDS_DATA_DIR, else ~/tensorflow_datasets); `data.manual_dir=None` finds `input.txt` as
`moe_jax.data.find_manual_dir` describes. `moe.capacity_factor=None` (dropless) is set from the
command line as `--config.moe.capacity_factor=None`.
"""
import ml_collections
from ml_collections import config_dict

from moe_jax.spec import moe_config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # XLA:GPU deterministic ops (moe_jax/reproducibility.py): bitwise-repeatable GPU runs at some
  # speed cost; CPU and TPU runs are deterministic either way. Sweeps and claims turn it on.
  config.deterministic = False

  config.data = ml_collections.ConfigDict()
  config.data.name = 'tiny_shakespeare'
  config.data.manual_dir = config_dict.placeholder(str)
  config.data.data_dir = config_dict.placeholder(str)
  config.data.seq_len = 128
  config.data.batch_size = 8

  config.model = ml_collections.ConfigDict()
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.d_ff = 256  # dense FFN width
  config.model.moe_every = 2  # blocks 1 and 3 are MoE; 0 = dense
  config.model.activation = 'swiglu'
  config.model.dtype = 'float32'
  config.model.attention = 'auto'  # 'auto': cuDNN fused attention on GPU in bf16, else 'xla'
  config.model.allow_future_leak = False  # True builds routing that sees later tokens (to study it)

  # Every MoESpec field (moe_jax/spec.py documents them), defaults but for these.
  # priority='token' keeps capacity-bound top-k causal (moe_jax/causality.py).
  config.moe = moe_config(d_ff=256, priority='token')

  # Device mesh (docs/parallelism.md): data * expert = the device count, or 1x1 = one device.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.expert = 1  # divides moe.num_experts; expert weights are sharded over it

  config.train = ml_collections.ConfigDict()
  config.train.steps = 300
  config.train.learning_rate = 3e-3
  config.train.end_lr_fraction = 0.1  # cosine decays to learning_rate * end_lr_fraction
  config.train.warmup_steps = 30
  config.train.weight_decay = 0.1
  config.train.clip_norm = 1.0  # 0 = no clipping
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.eval_batches = 8
  config.train.checkpoint_every = 100
  config.train.keep_checkpoints = 2
  config.train.progress = True
  return config
