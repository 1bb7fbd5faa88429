"""The built-in router families, one module each; `moe_jax.moe.families` registers them by name
(config.moe.router) and holds the families users register.

  token_choice.py   'token_choice'   Switch, GShard / Mixtral, DeepSeek-V3 (sigmoid, aux-free)
  expert_choice.py  'expert_choice'  Zhou et al. 2022
  soft.py           'soft'           Soft MoE
  sinkhorn.py       'sinkhorn'       Megatron-LM's Sinkhorn router
  base_layers.py    'base'           BASE layers
  hash_layers.py    'hash'           Hash layers

`family.py` defines `Family` and the helpers families share; `projection.py` the modules that make
router logits. Layering: `moe_jax.routing` (array math) < these modules < `moe_jax.moe.families` (the
registry) < spec, layers, flops, causality, plan, sweep.
"""
