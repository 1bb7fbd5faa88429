"""A small byte-level MoE LM on Tiny Shakespeare that trains in about a minute on 2 CPU cores.

  moe-jax train --config configs/lm_tiny.py --workdir runs/lm_tiny [--config.model.d_model=64 ...]
  (on 8 devices: ... --config.mesh.data=2 --config.mesh.expert=4)

Presets (`--config configs/lm_tiny.py:ARG`, comma-separated): `dropless`, token choice without a
capacity (moe.capacity_factor=None); `scale=cpu` or `scale=gpu`, the LM of the paper claims
(experiments/) at that scale (`at_scale`).

`data.data_dir=None` prepares and reads TFDS files in TFDS's default data dir
($TFDS_DATA_DIR, else ~/tensorflow_datasets); `data.manual_dir=None` finds `input.txt` as
`moe_jax.data.text.find_manual_dir` describes.
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from moe_jax.moe.spec import moe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
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
  # 'bytes' (256 ids, batches a function of (seed, step)) or a SentencePiece .model file from
  # `moe-jax tokenizer` (streamed through Grain; model.vocab_size follows it).
  config.data.tokenizer = 'bytes'

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
  config.model.remat = 'none'  # per block: 'full' or a jax.checkpoint_policies name saves memory

  # Every MoESpec field (moe_jax/moe/spec.py documents them), defaults but for these.
  # priority='token' keeps capacity-bound top-k causal (moe_jax/moe/causality.py).
  config.moe = moe_config(d_ff=256, priority='token')

  config.mesh = common.mesh()
  config.train = common.train()  # 300 steps, held-out loss every 100 on 8 batches
  return common.with_presets(config, arg, at_scale)


def at_scale(config: ml_collections.ConfigDict, scale: str) -> None:
  """The paper claims' LM at `scale` (`common.SCALES`): one MoE block in two (cpu: 2 blocks on Tiny
  Shakespeare; gpu: 4 blocks on English mix); Switch top-1, 8 experts, as members override."""
  common.check_scale(scale)
  config.deterministic = True  # bitwise-repeatable GPU runs (moe_jax/reproducibility.py)
  if scale == 'cpu':
    config.data.update(seq_len=64, batch_size=16)
    config.model.update(d_model=64, num_layers=2, num_heads=2, d_ff=256, moe_every=2)
    config.moe.update(num_experts=8, d_ff=256)
    config.train.update(steps=200, warmup_steps=10, learning_rate=1e-2, log_every=10,
                        eval_every=100, eval_batches=4)
  else:
    # Sized for runs that settle (experiments/PROTOCOL.md): a 34M-parameter dense model, batches of
    # 64 x 512 = 32,768 bytes, 1,500 steps = 49M bytes, about one pass over English mix's 50.4M
    # training bytes; bf16 compute with float32 weights (the router is float32 whatever the dtype).
    config.deterministic = False  # the pilot's seed noise includes XLA:GPU's reduction order
    config.data.update(name='english_mix', seq_len=512, batch_size=64)
    config.model.update(d_model=512, num_layers=8, num_heads=8, d_ff=2048, moe_every=2,
                        dtype='bfloat16')
    config.moe.update(num_experts=8, d_ff=2048)
    config.train.update(steps=1500, warmup_steps=75, learning_rate=1e-3, log_every=10,
                        eval_every=250, eval_batches=12)  # 12 x 64 x 512 of the ~0.5M held out
  config.train.update(checkpoint_every=0, progress=False)  # final checkpoint only
