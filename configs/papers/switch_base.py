"""Switch-Base, 128 experts (Fedus et al. 2022, Table 9), pre-trained on C4.

Table 9: 7B parameters, 124B FLOPs per sequence (those of T5-Base: one expert per token).
T5-Base (t5_base.py) with every other FFN of encoder and decoder a Switch layer: 128 experts of
the dense FFN's width (3,072), top-1, capacity factor 1.25, load-balancing coefficient 0.01,
router jitter 1e-2 (`common.SWITCH_MOE`).

Counts: as t5_base.py, plus the experts and routers (768 x 128 per MoE layer); active: one expert
per token. The released checkpoint (google/switch-base-128) holds ~7.4B parameters.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 6 encoder and 6 decoder blocks, batch 16 (50.5 GiB planned; 51.2 GiB measured on an
H100, README).
"""
from configs.papers import common


def get_config(arg=None):
  return common.switch('base', arg=arg)
