"""Architectures (the dense part and the MoE layer contract) and checkpoint loading."""
