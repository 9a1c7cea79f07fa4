"""Models and the modules that quantization swaps into them."""

from lowbit.nn.llama import Llama, LlamaConfig

__all__ = ["Llama", "LlamaConfig"]
