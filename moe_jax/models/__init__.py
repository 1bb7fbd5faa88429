"""Models built from MoE layers: the decoder-only transformer LM."""
