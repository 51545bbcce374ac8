"""Text-to-image pipelines: a tiny IFPipeline built locally, fine-tuned UNet saved and reloaded."""
import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, IFPipeline, UNet2DConditionModel

from ambient.models import ModelConfigError, load_pipeline_unet, unet_location
from ambient.pipelines import (
    IF_MAX_TEXT_TOKENS,
    generate_with_pipeline,
    make_tiny_text_pipeline,
    save_finetuned_pipeline,
)
from ambient.precond import noise_prediction
from ambient.text import TextEncoder
from tests.helpers import one_thread  # noqa: F401  (fixture)

STEPS = 3
RESOLUTION = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_text_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny", resolution=RESOLUTION)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_pipeline_reloads_as_if_and_generates(tiny):
    pipeline = DiffusionPipeline.from_pretrained(tiny, use_safetensors=True)
    assert isinstance(pipeline, IFPipeline)
    assert pipeline.unet.config.in_channels == 3 and pipeline.unet.config.out_channels == 6
    assert not list(tiny.rglob("*.bin"))  # safetensors only

    prompts = ["a red cat", "a blue dog"]
    images = generate_with_pipeline(tiny, prompts, num_inference_steps=STEPS, guidance_scale=4.0, seed=3)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    again = generate_with_pipeline(tiny, prompts, num_inference_steps=STEPS, guidance_scale=4.0, seed=3)
    assert torch.equal(images, again)


def test_tiny_pipeline_is_reproducible_from_its_seed(tmp_path, tiny):
    rebuilt = make_tiny_text_pipeline(tmp_path / "rebuilt", resolution=RESOLUTION)
    assert _same_weights(_state(load_pipeline_unet(rebuilt)), _state(load_pipeline_unet(tiny)))


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_the_prompt_reaches_the_unet(tiny, guidance_scale):
    # Same seed, same starting noise: only the text differs.
    cat, dog = (generate_with_pipeline(tiny, [p], num_inference_steps=STEPS, guidance_scale=guidance_scale)
                for p in ("a red cat", "a blue dog"))
    assert not torch.allclose(cat, dog, atol=1e-4)


def test_grayscale_pipeline_generates(tmp_path):
    gray = make_tiny_text_pipeline(tmp_path / "gray", resolution=RESOLUTION, channels=1)
    assert generate_with_pipeline(gray, ["x", "y"], num_inference_steps=2).shape == (2, 1, RESOLUTION, RESOLUTION)


def test_save_finetuned_pipeline_replaces_only_the_unet(tmp_path, tiny):
    source = DiffusionPipeline.from_pretrained(tiny, use_safetensors=True)
    unet = load_pipeline_unet(tiny)
    assert _same_weights(_state(unet), _state(source.unet))
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 0.01
    perturbed = _state(unet)

    out = save_finetuned_pipeline(tiny, unet, tmp_path / "finetuned")
    saved = DiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert isinstance(saved, IFPipeline)
    assert _same_weights(_state(saved.unet), perturbed)
    assert not _same_weights(_state(saved.unet), _state(source.unet))
    assert _same_weights(_state(saved.text_encoder), _state(source.text_encoder))
    assert saved.tokenizer.get_vocab() == source.tokenizer.get_vocab()
    assert saved.tokenizer("A Red cat").input_ids == source.tokenizer("A Red cat").input_ids
    assert dict(saved.scheduler.config) == dict(source.scheduler.config)

    before = generate_with_pipeline(tiny, ["a red cat"], num_inference_steps=STEPS)
    after = generate_with_pipeline(out, ["a red cat"], num_inference_steps=STEPS)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.equal(before, after)

    with pytest.raises(FileExistsError):
        save_finetuned_pipeline(tiny, unet, out)


def test_save_finetuned_pipeline_refuses_a_unet_the_pipeline_cannot_sample(tmp_path, tiny):
    config = dict(load_pipeline_unet(tiny).config)
    widened = UNet2DConditionModel.from_config({**config, "in_channels": 4})  # e.g. an ambient mask channel
    with pytest.raises(ModelConfigError, match="in_channels"):
        save_finetuned_pipeline(tiny, widened, tmp_path / "finetuned")
    assert not (tmp_path / "finetuned" / "model_index.json").exists()


def test_learned_variance_is_dropped_when_saving(tmp_path, tiny):
    # Real IF samples with its learned variance half, which noise-only fine-tuning does not train.
    learned = shutil.copytree(tiny, tmp_path / "learned")
    scheduler_file = learned / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**config, "variance_type": "learned_range"}))

    out = save_finetuned_pipeline(learned, load_pipeline_unet(learned), tmp_path / "finetuned")
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["variance_type"] == "fixed_small"
    assert {k: v for k, v in saved.items() if not k.startswith("_") and k != "variance_type"} == \
           {k: v for k, v in config.items() if not k.startswith("_") and k != "variance_type"}


def test_noise_prediction_is_the_first_half(tiny):
    unet = load_pipeline_unet(tiny)
    x, text = torch.randn(2, 3, RESOLUTION, RESOLUTION), torch.randn(2, IF_MAX_TEXT_TOKENS, 32)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 900]), encoder_hidden_states=text).sample
    assert noise_prediction(out, 3).shape == x.shape
    assert torch.equal(noise_prediction(out, 3), out.split(3, dim=1)[0])


def test_a_folder_without_a_unet_is_a_config_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelConfigError, match="model.path"):
        load_pipeline_unet(tmp_path)
    with pytest.raises(ModelConfigError, match="model.path"):
        unet_location(str(tmp_path), pipeline_only=True)


def test_encode_prompt_is_t5_of_77_padded_tokens_with_mask(tiny):
    pipeline = IFPipeline.from_pretrained(tiny, use_safetensors=True)
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    captions = ["  A Red Cat on a mat ", "word " * 100]  # the second is longer than 77 tokens
    embeds, negative = pipeline.encode_prompt(captions, do_classifier_free_guidance=True, device="cpu",
                                              clean_caption=False)

    def t5(texts, **tokenizer_options):
        tokens = tokenizer(texts, return_tensors="pt", **tokenizer_options)
        with torch.no_grad():
            return encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state

    padded = dict(padding="max_length", max_length=77, truncation=True, add_special_tokens=True)
    expected = t5([c.lower().strip() for c in captions], **padded)
    assert embeds.shape == (2, 77, 32)
    assert torch.equal(embeds, expected)
    trainer_encoder = TextEncoder(tiny, "text_encoder", "tokenizer", max_length=IF_MAX_TEXT_TOKENS)
    assert torch.equal(trainer_encoder.encode(captions), embeds)
    # the unconditional embedding is "" encoded the same way, not zeros
    assert torch.equal(negative, t5(["", ""], **padded))
    assert negative.abs().sum() > 0

    # these checks would catch an encoder call without the mask or without max_length padding
    tokens = tokenizer(captions[:1], return_tensors="pt", **padded)
    with torch.no_grad():
        unmasked = encoder(input_ids=tokens.input_ids).last_hidden_state
    assert not torch.allclose(unmasked, embeds[:1], atol=1e-4)
    assert t5(captions[:1], padding="longest").shape[1] < 77
