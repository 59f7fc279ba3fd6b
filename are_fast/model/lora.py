"""LoRA on the compressor through peft (optional dependency: ``pip install peft``)."""
from __future__ import annotations


def apply_lora(compressor, rank: int = 32, alpha: int | None = None, dropout: float = 0.1) -> None:
    """Wrap the compressor's body with LoRA adapters on every linear layer; the rows of the <EMBED{i}> tokens
    stay trainable (they are new), the rest of the body is frozen. ``save_pretrained`` merges the adapters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora: LoRA needs the peft package (pip install peft)") from None
    if rank < 1:
        raise ValueError(f"lora_rank: expected at least 1, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules="all-linear",
                        bias="none", trainable_token_indices=list(compressor.embed_token_ids))
    compressor.backbone = get_peft_model(compressor.backbone, config)
