"""Neural-network building blocks: Module, layers, and gradient utilities."""
from . import utils
from .layers import GELU, Dropout, Embedding, LayerNorm, Linear, ModuleList, ReLU, Sequential
from .lora import LoRALinear, trainable_parameters
from .module import Module, Parameter

__all__ = ["Module", "Parameter", "Linear", "Embedding", "LayerNorm", "Dropout", "ReLU", "GELU",
           "ModuleList", "Sequential", "LoRALinear", "trainable_parameters", "utils"]
