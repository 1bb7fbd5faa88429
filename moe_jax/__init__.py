"""moe-jax: Mixture-of-Experts routing research in JAX/Flax.

Shape letters, the same in every docstring:

  B  batch: sequences or images          L  tokens of one sequence (or image)
  G  token groups, routed apart          T  tokens of one group, routed together
  d  model width                         f  hidden width of one expert (d_ff)
  E  routed experts                      k  experts per token (token choice)
  C  capacity: slots of one expert for one group
  S  slots of one expert in Soft MoE (slots_per_expert): its buffers are [E, S, d]
  M  rows of an expert-sorted buffer ('ragged' and 'blocked' dispatch)
  H  attention heads                     D  width of one head
  V  vocabulary (256 bytes)
  h, w, c  image height, width, channels; N images of a data set

A router sees one group: logits [T, E]. The MoE layer cuts [B, L, d] into G groups of T tokens
(`MoESpec.group_by`: B sequences of L, L positions of B, or one group of B * L). The grouped matmul
kernels (`moe/kernels/`) use matmul letters of their own: [M, K] @ [E, K, N].
"""
