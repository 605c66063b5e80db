"""Neural-network building blocks: Module, layers, and gradient utilities."""
from . import utils
from .layers import (GELU, Dropout, Embedding, LayerNorm, Linear, ModuleList, ReLU, Sequential, init_skipped,
                     skip_init)
from .lora import LoRALinear, trainable_parameters
from .module import Module, Parameter

__all__ = ["Module", "Parameter", "Linear", "Embedding", "LayerNorm", "Dropout", "ReLU", "GELU",
           "ModuleList", "Sequential", "skip_init", "init_skipped", "LoRALinear", "trainable_parameters", "utils"]
