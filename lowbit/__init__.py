"""lowbit: train transformer language models in low precision on one CPU or many GPUs."""

__version__ = "0.1.0"
