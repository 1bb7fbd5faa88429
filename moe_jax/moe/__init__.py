"""The MoE layer: its spec, router families, experts, dispatch (kernels and exchange included), causality and FLOPs."""
