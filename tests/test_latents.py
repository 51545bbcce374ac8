"""Latent pipelines: a tiny Stable-Diffusion-style pipeline built locally, folder checks, the latent cache."""
import shutil
import warnings

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline

from ambient.config import ConfigError
from ambient.latents import LatentCache, check_latent_pipeline, check_resolution, make_tiny_sd_pipeline, vae_factor

RESOLUTION = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only spin-wait on a busy 2-core box
    yield
    torch.set_num_threads(before)


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
    with pytest.raises(ConfigError, match=r"model\.path=.*no vae.*a VAE is required"):
        check_latent_pipeline(broken)
    with pytest.raises(ConfigError, match=r"model\.path="):
        check_latent_pipeline(tmp_path / "missing")


def test_a_resolution_the_vae_cannot_halve_is_refused_naming_dataset_resolution(tiny_sd):
    check_resolution(16, tiny_sd)
    with pytest.raises(ConfigError, match=r"dataset\.resolution=15 .*multiple of 2"):
        check_resolution(15, tiny_sd)
