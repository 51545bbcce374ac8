"""evaluate.py on a latent-pipeline fine-tune (issue 17, item 4): generations decoded by the run's VAE and
compared in pixels, membership probed in latent space, the reconstruction attack skipped with its reason."""
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ambient.latent_model import LatentModel
from ambient.latents import make_tiny_sd_pipeline
from ambient.pipeline import LATENT_INPAINT, load_run
from ambient.seeding import Stream, seeded_generator
from tests.helpers import compose, one_thread  # noqa: F401  (fixture)

RESOLUTION = 16
CAPTION = "a handwritten digit two"
CANARIES = "dataset.duplicate={kind:canary,count:2,times:[1,3],seed:7,references:6}"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A 2-step full fine-tune of a tiny SD pipeline on 10 captioned digits (+ planted canaries), 6 held out."""
    from ambient.training import train

    root = tmp_path_factory.mktemp("latent_eval")
    source = make_tiny_sd_pipeline(root / "source", resolution=RESOLUTION, channels=1)
    train(compose("train", ["experiment=finetune_latent", f"model.path={source}", "dataset.limit=16",
                            "dataset.holdout=6", CANARIES, "train.batch_size=4", "train.steps=2",
                            "train.checkpoint_every=0", "sample.count=0"]), root / "run")
    return root / "run"


def test_a_latent_run_is_attacked_end_to_end(latent_run, tmp_path, monkeypatch):
    from ambient import latents
    from ambient.attack import schema
    from ambient.evaluation import evaluate_run

    encoded, original = [], latents.encode
    monkeypatch.setattr(latents, "encode", lambda vae, images, batch_size=32: encoded.append(len(images))
                        or original(vae, images, batch_size))
    cache_before = (latent_run / "latents.safetensors").read_bytes()
    out = tmp_path / "eval"
    cfg = compose("evaluate", [f"run_dir={latent_run}", f"out_dir={out}", "attack.prompts=2",
                               "attack.samples_per_prompt=3", "attack.batch_size=2", "attack.num_steps=2",
                               "attack.min_clique=2", "mia.draws=1", "mia.multi_t.timesteps=[50,100]",
                               "mia.secmi.t_sec=20", "mia.secmi.interval=10"])
    report = json.loads(evaluate_run(latent_run, cfg, out).read_text())
    split = json.loads((latent_run / "split.json").read_text())
    # Membership in latent space: the members' latents come from the run's cache (exactly those trained on),
    # only the 6 held-out images go through the VAE, and the cache is left as it was.
    assert sum(encoded) == 6 and (latent_run / "latents.safetensors").read_bytes() == cache_before
    assert report["mia"]["members"] == 10 and report["mia"]["non_members"] == len(split["holdout"]) == 6
    for section in ("mia", "secmi", "pia", "mia_multi_t"):
        assert 0 <= report[section]["auc"] <= 1
    # Extraction and the calibrated report against the held-out null, in pixels.
    assert report["counts"] == {"generations": 6, "prompts": 2, "train_images": len(split["members"])}
    assert report["null"]["counts"]["source"].startswith("6 held-out images of the run")
    assert report["calibration"]["paper_delta"] == 0.15 and "extracted" in report["extraction"]
    assert report["source"]["settings"]["latent"]["image_resolution"] == RESOLUTION
    # Canaries: exposure by the latent loss attack, extraction in pixels; no completions (no inpainting).
    canaries = report["canaries"]
    assert canaries["planted"] == 4 and canaries["references"] == 6
    assert not any(k.startswith("reconstruction") for k in canaries)
    # The attack that does not apply is said to be skipped, with its reason, in report.json and report.md.
    assert report["reconstruction"] == {"skipped": True, "note": f"reconstruction attack skipped: {LATENT_INPAINT}"}
    assert "Note: reconstruction attack skipped: pixel inpainting does not carry over" in (out / "report.md").read_text()
    assert not [(s, k) for s, k, _ in schema.figures(report) if schema.field_for(s, k) is None]
    # Generations: PNGs of the images' size and channels (VAE-decoded), not of the latents'.
    pngs = sorted((out / "samples").rglob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        with Image.open(png) as img:
            assert img.size == (RESOLUTION, RESOLUTION) and img.mode == "L"
    # Each PNG is the model's generation for its (seed, prompt, position), quantized.
    model = LatentModel.from_run(latent_run)
    folder = pngs[-1].parent
    from ambient.evaluation import prompt_stream

    caption = (folder / "prompt.txt").read_text()
    again = model.generate_range(1, 1, seed=0 * 100_003 + prompt_stream(caption), caption=caption, num_steps=2,
                                 cfg_scale=3.0)
    expected = ((again[0, 0] + 1) / 2 * 255).round().to(torch.uint8).numpy()
    with Image.open(folder / "000001.png") as img:
        assert np.abs(np.asarray(img).astype(int) - expected.astype(int)).max() <= 1


def test_generation_is_the_saved_sd_pipeline_s_from_the_same_seeded_latents(latent_run):
    """The adapter's one generation path (AmbientPipeline's sampler on the latent UNet, then the VAE) equals
    diffusers' StableDiffusionPipeline on model/pipeline started from the same per-image latents."""
    model = LatentModel.from_run(latent_run)
    images = model.generate_range(0, 3, seed=5, caption=CAPTION, num_steps=4, cfg_scale=3.0)
    assert images.shape == (3, 1, RESOLUTION, RESOLUTION) and images.abs().max() <= 1
    sd = StableDiffusionPipeline.from_pretrained(latent_run / "model" / "pipeline", use_safetensors=True)
    sd.set_progress_bar_config(disable=True)
    start = torch.stack([torch.randn(model.latent_shape, generator=seeded_generator(5, i, Stream.SAMPLE))
                         for i in range(3)])
    theirs = sd([CAPTION] * 3, num_inference_steps=4, guidance_scale=3.0, latents=start, output_type="pt",
                height=RESOLUTION, width=RESOLUTION).images * 2 - 1
    torch.testing.assert_close(images, theirs, atol=1e-4, rtol=0)
    # reproducible per (seed, position): any sub-range, any batch, the same images; another seed, others
    torch.testing.assert_close(model.generate_range(1, 2, seed=5, caption=CAPTION, num_steps=4, cfg_scale=3.0),
                               images[1:], atol=0, rtol=0)
    other = model.generate_range(0, 1, seed=6, caption=CAPTION, num_steps=4, cfg_scale=3.0)
    assert (other[0] - images[0]).abs().max() > 1e-3


def test_what_a_latent_model_cannot_do_is_refused_with_the_reason(latent_run):
    model = LatentModel.from_run(latent_run)
    assert model.unsupported == {"inpaint": LATENT_INPAINT}
    x, keep = torch.zeros(1, 1, RESOLUTION, RESOLUTION), torch.ones(1, 1, RESOLUTION, RESOLUTION)
    with pytest.raises(NotImplementedError, match="inpainting does not carry over"):
        model.inpaint(x, keep, [seeded_generator(0)])
    with pytest.raises(NotImplementedError, match="inpainting does not carry over"):  # nor through the UNet's own
        model.model.inpaint(model.encode(x), torch.ones(1, 1, 8, 8), [seeded_generator(0)], captions=[CAPTION])
    from ambient.evaluation import rebuild_training_set

    members, _, _ = rebuild_training_set(latent_run, model.settings)
    assert model.encode_set(members.select([])).as_float().shape == (0, 4, RESOLUTION // 2, RESOLUTION // 2)
    with pytest.raises(ValueError, match="model/pipeline"):  # without the VAE it would return latents
        load_run(latent_run).generate(1, caption=CAPTION)
