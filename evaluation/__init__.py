"""Evaluating an encoder on labeled images: kNN, linear probe, fine-tuning, their inputs and accuracy."""
