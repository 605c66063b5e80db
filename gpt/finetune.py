"""The trainer's fine-tuning hooks, from the run's config: LoRA adapters (the base frozen, maybe
quantized), gradient checkpointing, and SFT batches in place of the text's.

>>> spec = prepare_model(model, cfg)        # after the weights are loaded, before the optimizer  # doctest: +SKIP
>>> sft = load_sft(cfg, tokenizer, resumed) # None without --sft-data                            # doctest: +SKIP
"""
from __future__ import annotations

from typing import Optional

from .config import UsageError
from .lora import LoRASpec, apply_lora
from .sft import SFTData


def lora_spec(cfg) -> Optional[LoRASpec]:
    """The run's LoRASpec (None without --lora-rank), from fields validated by TrainConfig."""
    if not cfg.lora_rank:
        return None
    return LoRASpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
                    base_dtype=cfg.lora_base)


def prepare_model(model, cfg) -> Optional[LoRASpec]:
    """Apply the config's fine-tuning settings to the model the trainer built or loaded: LoRA
    adapters on its target Linears (everything else frozen; an int8/int4 base quantized now, so
    it must hold the base's weights already) and --grad-checkpoint. Returns the LoRASpec or None."""
    model.grad_checkpoint = bool(cfg.grad_checkpoint) and hasattr(model, "grad_checkpoint")
    spec = lora_spec(cfg)
    if spec is not None:
        if cfg.model != "gpt":
            raise UsageError(f"--lora-rank adapts the GPT's Linear layers; the {cfg.model} model has none")
        apply_lora(model, spec)
    return spec


def load_sft(cfg, tokenizer, resumed=None) -> Optional[SFTData]:
    """The --sft-data examples, tokenized (None without it). A resumed run must see the same file."""
    saved = (resumed.data or {}).get("sft_sha256") if resumed is not None else None
    if cfg.sft_data is None:
        if saved:
            raise UsageError("this run trained on an --sft-data file; pass it again (--sft-data PATH) to resume")
        return None
    data = SFTData.load(cfg.sft_data, tokenizer, cfg.block_size)
    if resumed is not None and saved != data.sha256:
        raise UsageError(f"--sft-data {cfg.sft_data} is not the file this run trained on (its sha256 differs"
                         f"{'' if saved else '; the run had no --sft-data'}); a resumed run keeps its data")
    return data


def describe_finetune(model, spec: Optional[LoRASpec], sft: Optional[SFTData]) -> str:
    """One log line: what is trained, and on what."""
    parts = []
    if spec is not None:
        trainable = sum(p.size for p in model.parameters() if p.requires_grad)
        total = model.config.num_parameters()  # the base model's (a packed int4 weight is not half as many)
        parts.append(f"LoRA rank {spec.rank} alpha {spec.alpha:g} on {spec.targets}, base {spec.base_dtype}: "
                     f"{trainable:,} trainable parameters ({100 * trainable / total:.2f}% of the model's {total:,})")
    if sft is not None:
        parts.append(f"SFT: {len(sft.train):,} train / {len(sft.val):,} val examples, loss on responses only")
    return "; ".join(parts)
