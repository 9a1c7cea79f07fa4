"""Models and the modules that quantization swaps into them."""

from lowbit.nn.convert import apply_quant_config, convert_model
from lowbit.nn.llama import Llama, LlamaConfig
from lowbit.nn.quant_linear import QuantLinear

__all__ = ["Llama", "LlamaConfig", "QuantLinear", "apply_quant_config", "convert_model"]
