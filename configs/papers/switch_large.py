"""Switch-Large, 128 experts (Fedus et al. 2022, Table 9), pre-trained on C4.

Table 9: 26B parameters, 425B FLOPs per sequence (those of T5-Large). T5-Large (t5_large.py)
with every other FFN of encoder and decoder a Switch layer of 128 experts of width 4,096, routed
as switch_base.py.

Counts: as switch_base.py. 26B is the count of T5 v1.0's 2-matrix FFN of 4,096, as in the
released checkpoint (google/switch-large-128, ~26.3B), which this config follows; T5.1.1-Large's
gated-GELU FFN of 2,816 (three matrices) would give 27.2B.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: 4 encoder and 4 decoder blocks, batch 16 (59.4 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.switch('large', arg=arg)
