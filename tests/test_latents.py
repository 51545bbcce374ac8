"""Latent pipelines: a tiny Stable-Diffusion-style pipeline built locally, folder checks, the latent cache."""
import shutil
import warnings

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline

from ambient.config import ConfigError, check_latent_pipeline, vae_factor, validate
from ambient.latents import LatentCache, make_tiny_sd_pipeline
from tests.helpers import compose, one_thread  # noqa: F401  (fixture)

RESOLUTION = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny", resolution=RESOLUTION)


def _images(n, seed=0, resolution=RESOLUTION):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)


class CountingVAE(torch.nn.Module):
    """The real AutoencoderKL, counting the images it encodes."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.seen = vae, 0
        self.config = vae.config

    def encode(self, x):
        self.seen += len(x)
        return self.vae.encode(x)


def test_tiny_sd_pipeline_is_a_stable_diffusion_pipeline_that_generates(tiny_sd):
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True)
    assert isinstance(pipeline, StableDiffusionPipeline) and isinstance(pipeline.vae, AutoencoderKL)
    assert not list(tiny_sd.rglob("*.bin"))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(["a red cat", "a dog"], num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()
    assert vae_factor(tiny_sd) == 2 and check_latent_pipeline(tiny_sd) == tiny_sd


def test_every_image_is_encoded_once_and_a_resumed_run_reuses_the_cache(tmp_path, tiny_sd):
    vae = CountingVAE(AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"))
    images = _images(6)
    images[5] = images[1]  # an exact duplicate: one encode
    cache = LatentCache(vae, tmp_path / "latents.safetensors", batch_size=4)
    latents = cache(images)
    assert latents.shape == (6, 4, RESOLUTION // 2, RESOLUTION // 2) and vae.seen == 5 and cache.encoded == 5
    assert torch.equal(latents[5], latents[1])
    direct = vae.vae.encode(images[:2].float() / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(latents[:2], direct)
    # a resumed run: a new cache object over the same file encodes nothing
    vae.seen = 0
    again = LatentCache(vae, tmp_path / "latents.safetensors")(images)
    assert vae.seen == 0 and torch.equal(again, latents)
    # one new image: only it is encoded
    more = torch.cat([images, _images(1, seed=9)])
    LatentCache(vae, tmp_path / "latents.safetensors")(more)
    assert vae.seen == 1


def test_a_changed_vae_or_resolution_invalidates_the_cache(tmp_path, tiny_sd):
    path = tmp_path / "latents.safetensors"
    vae = CountingVAE(AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"))
    images = _images(3)
    before = LatentCache(vae, path)(images)
    other = CountingVAE(AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"))
    with torch.no_grad():
        next(other.vae.parameters()).add_(0.1)  # same config, different weights
    with pytest.warns(UserWarning, match="re-encoding every image.*vae"):
        after = LatentCache(other, path)(images)
    assert other.seen == 3 and not torch.allclose(after, before)
    smaller = _images(3, resolution=8)
    with pytest.warns(UserWarning, match="re-encoding every image.*resolution"):
        LatentCache(other, path)(smaller)
    assert other.seen == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache is reused silently
        LatentCache(other, path)(smaller)
    assert other.seen == 6


def test_a_pipeline_folder_without_a_vae_is_refused_naming_model_path(tmp_path, tiny_sd):
    broken = tmp_path / "no_vae"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match=r"model\.path=.*a VAE is required.*it has no vae/"):
        check_latent_pipeline(broken)
    with pytest.raises(ConfigError, match=r"model\.path="):
        check_latent_pipeline(tmp_path / "missing")


def test_bad_latent_settings_fail_at_start_naming_the_key(tiny_sd):
    common = ["experiment=finetune_latent", f"model.path={tiny_sd}"]
    validate(compose("train", common))
    validate(compose("train", [*common, "corruption=noise", "corruption.sigma=0.3"]))
    for override, key in [("dataset.resolution=15", r"dataset\.resolution=15 .*multiple of 2"),
                          ("corruption=mask60", r"corruption='mask' .*pixel masks do not carry over"),
                          ("model.path=/nonexistent", r"model\.path="),
                          ("model.finetune=half", r"model\.finetune='half' .*full \| lora"),
                          ("model.finetune=lora model.lora.rank=0", r"model\.lora\.rank")]:
        with pytest.raises(ConfigError, match=key):
            validate(compose("train", [*common, *override.split()]))


def test_training_caption_embeddings_equal_the_pipeline_s_own(tiny_sd):
    """What the UNet is fine-tuned on is what StableDiffusionPipeline.encode_prompt gives at generation."""
    from ambient.text import build_text_encoder

    encoder = build_text_encoder({"kind": "pretrained", "path": str(tiny_sd), "max_length": 77})
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True)
    captions = ["a handwritten digit two", "x"]
    ours = encoder.encode(captions)
    theirs, _ = pipeline.encode_prompt(captions, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs.float())


@pytest.mark.slow
def test_fine_tune_a_latent_pipeline_end_to_end(tmp_path):
    """experiment=finetune_latent on captioned digits: latents cached once, the UNet trained, the
    pipeline saved back and loadable with DiffusionPipeline.from_pretrained; a resume reuses the cache."""
    import json

    from ambient.training import train

    source = make_tiny_sd_pipeline(tmp_path / "source", resolution=RESOLUTION, channels=1)
    common = ["experiment=finetune_latent", f"model.path={source}", "dataset.limit=12", "train.batch_size=4",
              "train.checkpoint_every=2", "sample.count=2", "sampler.num_steps=2"]
    run = tmp_path / "run"
    summary = train(compose("train", [*common, "train.steps=2", "corruption=noise", "corruption.sigma=0.2"]), run)
    assert (run / "latents.safetensors").is_file() and (run / "samples.png").is_file()
    pipeline = DiffusionPipeline.from_pretrained(summary["pipeline"], use_safetensors=True)
    assert isinstance(pipeline, StableDiffusionPipeline)
    before = DiffusionPipeline.from_pretrained(source, use_safetensors=True).unet.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in pipeline.unet.state_dict().items())  # it was trained
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a handwritten digit two", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                      output_type="pt").images
    assert images.shape == (1, 1, RESOLUTION, RESOLUTION) and torch.isfinite(images).all()
    settings = json.loads((run / "model" / "model_index.json").read_text())["ambient"]
    assert settings["channels"] == 4 and settings["resolution"] == RESOLUTION // 2
    assert settings["latent"] == {"image_channels": 1, "image_resolution": RESOLUTION, "finetune": "full"}
    assert settings["noisy"]["objective"] == "ambient" and settings["noisy"]["sigma_n"] == 0.2  # DDPM form, latent units
    from ambient.pipeline import load_run

    with pytest.raises(ValueError, match="model/pipeline"):  # model/ would sample latents: it says where to go
        load_run(run).generate(1, caption="a handwritten digit two")
    # a resumed run (more steps from the last checkpoint) reuses every cached latent
    from ambient import latents

    calls = []
    original = latents.encode
    latents.encode = lambda vae, images, batch_size=32: calls.append(len(images)) or original(vae, images, batch_size)
    try:
        (run / "summary.json").unlink()
        shutil.rmtree(run / "model")
        train(compose("train", [*common, "train.steps=4", "corruption=noise", "corruption.sigma=0.2", "resume=auto",
                                f"run_dir={run}"]), run)
    finally:
        latents.encode = original
    assert calls == []


@pytest.mark.slow
def test_lora_fine_tune_trains_only_adapters_and_saves_them_alone_and_merged(tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from ambient.training import train

    source = make_tiny_sd_pipeline(tmp_path / "source", resolution=RESOLUTION, channels=1)
    run = tmp_path / "lora"
    summary = train(compose("train", ["experiment=finetune_latent", f"model.path={source}", "dataset.limit=8",
                                      "train.batch_size=4", "train.steps=3", "train.lr=1e-2", "train.lr_warmup_steps=1",
                                      "train.checkpoint_every=0", "sample.count=0", "model.finetune=lora"]), run)
    adapters = load_file(run / "model" / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all("lora" in k for k in adapters)
    base = StableDiffusionPipeline.from_pretrained(source, use_safetensors=True).unet
    tuned = DiffusionPipeline.from_pretrained(summary["pipeline"], use_safetensors=True).unet  # merged, peft-free
    assert not any("lora" in k for k in tuned.state_dict())
    before, after = base.state_dict(), tuned.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(m in k for m in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)
    # the base pipeline + the saved adapters computes what the merged UNet computes
    with_lora = StableDiffusionPipeline.from_pretrained(source, use_safetensors=True)
    with_lora.load_lora_weights(run / "model" / "lora")
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(with_lora.unet(x, t, text).sample, tuned(x, t, text).sample, atol=1e-5, rtol=1e-4)
