"""Networks: diffusers UNets built from config or loaded (pretrained, a pipeline's, a finished
run's), with the ambient mask channel. Every UNet location and load lives here.

An ambient model sees Ã·x_t plus Ã as one extra input channel (Daras et al. 2023). A pretrained
UNet gets that channel by widening its input convolution with zero-initialised weights, so
fine-tuning starts from exactly the pretrained function.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from ambient.config import MODEL_KINDS


class ModelConfigError(ValueError):
    pass


def downsampling_factor(num_levels: int) -> int:
    return 2 ** (num_levels - 1)


def _unet_kwargs(cfg, channels: int, resolution: int, mask_channel: bool, attention_block: str) -> dict:
    """The arguments UNet2DModel and UNet2DConditionModel share, from a `model` config node;
    attention_block names the down block used at levels with attention ("AttnDownBlock2D", ...)."""
    levels, attention = list(cfg.block_out_channels), list(cfg.attention_levels)
    if len(attention) != len(levels):
        raise ModelConfigError(f"model.attention_levels has {len(attention)} entries; "
                               f"model.block_out_channels has {len(levels)}")
    factor = downsampling_factor(len(levels))
    if resolution % factor:
        raise ModelConfigError(f"dataset.resolution={resolution} is not supported by model "
                               f"{cfg.name!r}: it must be a multiple of {factor}")
    return dict(
        sample_size=resolution,
        in_channels=channels + int(mask_channel),
        out_channels=channels,
        block_out_channels=tuple(levels),
        layers_per_block=int(cfg.layers_per_block),
        down_block_types=tuple(attention_block if a else "DownBlock2D" for a in attention),
        up_block_types=tuple(attention_block.replace("Down", "Up") if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=int(cfg.norm_num_groups),
        attention_head_dim=int(cfg.get("attention_head_dim", 8)),
        dropout=float(cfg.get("dropout", 0.0)),
    )


# A UNet2DModel from a `model` config node (kind: unet).
def build_unet(cfg, channels: int, resolution: int, mask_channel: bool, num_classes: int = 0) -> UNet2DModel:
    return UNet2DModel(**_unet_kwargs(cfg, channels, resolution, mask_channel, "AttnDownBlock2D"),
                       num_class_embeds=num_classes or None)


# A pixel-space text-conditional UNet2DConditionModel (kind: unet_text): cross-attention on caption
# embeddings at the levels with attention_levels true.
def build_text_unet(cfg, channels: int, resolution: int, mask_channel: bool,
                    cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(**_unet_kwargs(cfg, channels, resolution, mask_channel, "CrossAttnDownBlock2D"),
                                cross_attention_dim=int(cross_attention_dim))


def widen_input(unet: UNet2DModel, extra: int = 1) -> UNet2DModel:
    """Add `extra` input channels whose weights are zero, so the output is unchanged."""
    old = unet.conv_in
    new = torch.nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride,
                          old.padding, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra)
    return unet


def unet_location(path, pipeline_only: bool = False) -> tuple[str, str | None]:
    """(location, subfolder) of a UNet for `from_pretrained(location, subfolder=...)`: a pipeline
    folder keeps its UNet in `unet/`; a bare UNet folder (unless pipeline_only) holds config.json
    itself; anything else is taken as a hub id of a pipeline."""
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / "unet" / "config.json").is_file():
            return str(local), "unet"
        if pipeline_only:
            raise ModelConfigError(f"model.path={str(path)!r} is not a diffusers pipeline: it has no unet/config.json")
        if (local / "config.json").is_file():
            return str(local), None
        raise ModelConfigError(f"model.path={str(path)!r} holds neither a diffusers UNet nor a pipeline")
    return str(path), "unet"  # a hub id; from_pretrained reports what is missing


def _load(unet_class, path, pipeline_only: bool = False):
    location, subfolder = unet_location(path, pipeline_only)
    try:
        return unet_class.from_pretrained(location, subfolder=subfolder, use_safetensors=True)
    except OSError as err:
        raise ModelConfigError(f"model.path={str(path)!r}: cannot load a {unet_class.__name__} ({err})") from err


def load_pipeline_unet(path) -> UNet2DConditionModel:
    """The UNet of a text-to-image pipeline folder (or hub id)."""
    return _load(UNet2DConditionModel, path, pipeline_only=True)


def load_trained_unet(unet_dir, text: bool) -> UNet2DModel | UNet2DConditionModel:
    """A finished run's `model/unet` (safetensors)."""
    unet_class = UNet2DConditionModel if text else UNet2DModel
    return unet_class.from_pretrained(unet_dir, use_safetensors=True)


# Any diffusers UNet2DModel by local path or hub id (weights via safetensors).
def load_pretrained_unet(path: str, channels: int, mask_channel: bool) -> UNet2DModel:
    unet = _load(UNet2DModel, path)
    if unet.config.in_channels != channels or unet.config.out_channels != channels:
        raise ModelConfigError(f"model.path={path!r} has {unet.config.in_channels} input channels; "
                               f"the dataset has {channels} (set dataset.channels)")
    return widen_input(unet) if mask_channel else unet


def build_model(cfg, channels: int, resolution: int, mask_channel: bool, num_classes: int,
                cross_attention_dim: int | None = None) -> UNet2DModel | UNet2DConditionModel:
    """cross_attention_dim: the text encoder's width, for the text-conditional kinds."""
    if cfg.kind == "unet":
        return build_unet(cfg, channels, resolution, mask_channel, num_classes)
    if cfg.kind == "pretrained":
        return load_pretrained_unet(cfg.path, channels, mask_channel)
    if cfg.kind == "unet_text":
        return build_text_unet(cfg, channels, resolution, mask_channel, cross_attention_dim)
    if cfg.kind == "latent_pipeline" and cfg.get("finetune") == "lora":  # frozen UNet + trainable adapters
        from ambient.lora import add_lora

        unet = load_text_pipeline_unet(cfg.path, channels, cross_attention_dim)
        add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
        return unet
    if cfg.kind in ("pipeline", "latent_pipeline"):  # channels: the latents' for a latent pipeline
        return load_text_pipeline_unet(cfg.path, channels, cross_attention_dim)
    raise ModelConfigError(f"model.kind={cfg.kind!r}; allowed: {' | '.join(MODEL_KINDS)}")


# A text-to-image pipeline's UNet, fine-tuned as the official Ambient IF code does: no mask channel
# (the UNet keeps its shape, so the result still drops into the pipeline).
def load_text_pipeline_unet(path: str, channels: int, cross_attention_dim: int | None) -> UNet2DConditionModel:
    unet = load_pipeline_unet(path)
    if unet.config.in_channels != channels:
        raise ModelConfigError(f"model.path={path!r} has {unet.config.in_channels} input channels; "
                               f"the dataset has {channels} (set dataset.channels)")
    if cross_attention_dim is not None and unet.config.cross_attention_dim != cross_attention_dim:
        raise ModelConfigError(f"model.path={path!r} cross-attends to width {unet.config.cross_attention_dim}; "
                               f"text_encoder gives {cross_attention_dim} (use the pipeline's own encoder)")
    return unet
