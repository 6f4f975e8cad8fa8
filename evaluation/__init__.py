"""Evaluating an encoder on labeled images: kNN, linear probe, fine-tuning, distillation, their inputs and accuracy."""
