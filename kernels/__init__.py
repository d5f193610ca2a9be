"""Compute kernels: plain torch references shaped so GPU fast paths can slot in behind them.

Shape legend used throughout: T tokens, E experts, D hidden, I intermediate, K top-k,
H query heads, G key/value heads, L context length, B sequences.
"""
