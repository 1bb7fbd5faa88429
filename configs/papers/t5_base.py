"""T5-Base, the dense baseline of Switch-Base (Fedus et al. 2022, Table 9; Raffel et al. 2020).

Table 9: T5-Base, 0.2B parameters, 124B FLOPs per sequence; Raffel et al. (section 3.7): 220M
parameters. T5 v1.0: 12 encoder and 12 decoder blocks, d 768, 12 heads of 64, ReLU FFN of 3,072,
vocabulary 32,128, embeddings tied (`common.t5`).

Counts: every weight, the tied embedding once. Not counted: T5's relative position biases
(32 x 12 per stack, replaced here by RoPE, which has none). FLOPs per sequence = the project's
forward FLOPs per token x 626 tokens (512 input + 114 target); see the test for why they come out
above the paper's.

Presets (`common.cpu_scale`, `common.gpu_scale`): scale=cpu, the family at a test's size; scale=gpu,
one 80 GB GPU: batch 16 of the paper's 2,048 (6.1 GiB planned).
"""
from configs.papers import common


def get_config(arg=None):
  return common.t5('base', arg=arg)
