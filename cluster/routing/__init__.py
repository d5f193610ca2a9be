"""Routing traces (each token's experts per MoE layer), their importers, and evaluating placements against them."""
