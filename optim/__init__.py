"""Optimizers (LARS, SGD, AdamW), their parameter groups and the learning-rate schedule."""
