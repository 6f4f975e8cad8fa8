"""The pretraining loop: model, step, micro-batches, records, checkpoints and resume."""
