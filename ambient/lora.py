"""LoRA fine-tuning of a pipeline's UNet (peft), the common way people fine-tune Stable Diffusion.

`model.finetune=lora` freezes the UNet and adds low-rank adapters to its attention projections
(Hu et al. 2021; diffusers' train_text_to_image_lora.py targets to_q, to_k, to_v, to_out.0). The run
saves two things: the adapters alone (`<model>/lora/pytorch_lora_weights.safetensors`, for
`pipeline.load_lora_weights`) and a copy of the UNet with them merged (so the saved pipelines load and
generate with no peft at all). Needs `pip install peft` (the `lora` extra).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int, alpha: float, target_modules) -> None:
    """Freeze `unet` and add trainable LoRA adapters (rank, alpha) to its `target_modules`, in place."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                                target_modules=list(target_modules)))


def has_lora(unet) -> bool:
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


def merged(unet):
    """A copy of `unet` with its adapters merged into the base weights and removed: a plain diffusers
    model whose state dict loads anywhere. The trained model itself is left as it is."""
    if not has_lora(unet):
        return unet
    copy_ = copy.deepcopy(unet)
    copy_.fuse_lora(lora_scale=1.0)
    copy_.unload_lora()
    return copy_


def save_lora(unet, out_dir) -> Path:
    """The adapters alone, in the layout `StableDiffusionPipeline.load_lora_weights(out_dir)` reads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out / LORA_WEIGHTS


def trainable(module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: all parameters for a full fine-tune, only the adapters for LoRA."""
    return [p for p in module.parameters() if p.requires_grad]
