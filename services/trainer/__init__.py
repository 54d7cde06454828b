"""The trainer: Pass@k advantage estimators (``advantage``), the loss, the
training loop, the weight publisher, checkpoints and evaluation."""
