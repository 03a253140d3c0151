"""Pruning policies as small dataclasses (EntropyPrune, UNComp, FASA, TokenSparseAttention, baselines)."""
