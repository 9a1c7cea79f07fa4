"""The training loop and everything around it: data, checkpoints, loggers, metrics, distribution."""
