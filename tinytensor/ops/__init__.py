"""The primitives, one module per kind; importing this package registers them all.

    basic       add mul where neg pow exp log tanh sigmoid relu cast sum max reshape
                permute get_item cat mat_mul, and ``unbroadcast``
    fused       softmax log_softmax layer_norm cross_entropy gelu embedding dropout linear
    attention   scaled_dot_product_attention multi_head_attention
    modern      rms_norm relu_squared swiglu qk_norm_rope (the modern model options, fused)
    quant       quantized_linear (a frozen int8/4-bit blockwise weight), quantize_blockwise
    lora        lora_linear (a frozen base plus a low-rank update, fused: LoRA's layer)
    parallel    row-parallel NumPy (``for_row_chunks``) for the fused ops' elementwise chains

Each primitive is a ``tensor.Function`` subclass decorated with ``tensor.register``;
call them through ``tinytensor.functional`` (or the Tensor operators).
"""
from . import attention, basic, fused, lora, modern, parallel, quant  # noqa: F401  (importing registers the primitives)
