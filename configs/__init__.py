"""Experiment configs (ml_collections): one module per experiment, each with `get_config(arg)`.

  moe-jax train --config configs/lm_tiny.py[:ARG] --workdir DIR [--config.<field>=<value> ...]

ARG picks a config's presets (`common.parse_arg`), e.g. `configs/lm_tiny.py:scale=gpu,dropless`.
Sweeps and the paper claims (experiments/) import their base config as Python:
`from configs import lm_tiny`.
"""
