"""Paper-claim reproductions: one module per published claim, each a sweep with a verdict.

  python -m experiments run --scale cpu|gpu [--claims a,b] [--seeds N] --workdir DIR

trains every claim's members with every seed and writes DIR/claims.md (see `__main__`). The
claims, by key:
"""
CLAIMS = {
    'a': 'moe_vs_dense',
    'b': 'expert_choice_vs_top2',
    'c': 'fine_grained_shared',
    'd': 'z_loss_spikes',
    'e': 'capacity_factor',
    'f': 'soft_moe_vit',
}
__doc__ += ''.join(f'\n  {key}: experiments/{name}.py' for key, name in CLAIMS.items())
