"""T5-Large, the dense baseline of Switch-Large (Fedus et al. 2022, Table 9; Raffel et al. 2020).

Table 9: T5-Large, 0.7B parameters, 425B FLOPs per sequence. T5 v1.0: 24 encoder and 24 decoder
blocks, d 1,024, 16 heads of 64, ReLU FFN of 4,096, vocabulary 32,128, embeddings tied
(`common.t5`). Raffel et al. (section 3.7) say 770M, 4% above the released checkpoint's 738M,
which this config counts.

Counts: as t5_base.py.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: batch 16 (17.4 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.t5('large', arg=arg)
