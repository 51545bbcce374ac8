"""Text-conditional models: captioned training with caption defenses, CFG sampling, the caption
attack and caption-conditioned membership inference (real MiniLM, real diffusers UNets)."""
import json

import pytest
import torch

from ambient.data import load_digits
from ambient.evaluation import evaluate_run, prompts_of
from ambient.rundir import ModelDir
from ambient.text import build_text_conditioning
from ambient.trained import load_run
from ambient.training import train
from tests.helpers import compose

TEXT = ["model=unet_text_tiny", "text_encoder=minilm"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("text") / "run"
    cfg = compose("train", ["experiment=smoke", *TEXT, "corruption=mask80", "dataset.limit=24",
                            "dataset.holdout=4", "train.steps=8", "train.checkpoint_every=0", "sample.count=4"])
    train(cfg, run)
    return run


def test_digits_carry_captions():
    digits = load_digits(16)
    assert digits.prompts[0] == "a handwritten digit zero" and digits.prompts[7] == "a handwritten digit seven"


def test_text_run_saves_a_model_that_follows_its_caption(text_run):
    settings = ModelDir(text_run / "model").read_settings()
    assert settings["conditioning"] == "text" and settings["text_encoder"]["kind"] == "minilm"
    assert (text_run / "model" / "caption_embeddings.safetensors").is_file() and (text_run / "samples.png").is_file()
    model = load_run(text_run)
    assert model.net.unet.config.cross_attention_dim == 384 and model.net.unet.config.in_channels == 2
    seven = model.generate(2, seed=3, caption="a handwritten digit seven", num_steps=4)
    assert torch.equal(seven, model.generate(2, seed=3, caption="a handwritten digit seven", num_steps=4))
    two = model.generate(2, seed=3, caption="a handwritten digit two", num_steps=4)
    assert (seven - two).abs().max() > 1e-4  # the caption reaches the UNet through cross-attention
    guided = model.generate(2, seed=3, caption="a handwritten digit seven", num_steps=4, cfg_scale=4.0)
    assert (guided - seven).abs().max() > 1e-4
    with pytest.raises(ValueError, match="not class-conditional"):
        model.generate(1, label=3)


def test_classifier_free_guidance_is_the_usual_extrapolation(text_run):
    from ambient.samplers import ClassifierFreeGuidance

    model = load_run(text_run)
    emb = model.caption_embeddings(["a handwritten digit one", ""])
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor(2.0)
    cond, uncond = emb[:1].expand(2, -1, -1), emb[1:].expand(2, -1, -1)
    with torch.no_grad():
        c, u = model.net(x, sigma, None, cond), model.net(x, sigma, None, uncond)
        guided = ClassifierFreeGuidance(model.net, cond, uncond, 3.0)(x, sigma, None)
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("captions,changes", [("standard", False), ("randomize", True), ("noise", True)])
def test_caption_defenses_change_what_training_sees(captions, changes):
    cfg = compose("train", ["experiment=smoke", *TEXT, f"captions={captions}", "captions.empty_prob=0",
                            "dataset.limit=24"])
    digits = load_digits(16).select(list(range(24)))
    conditioning = build_text_conditioning(cfg, digits, None)
    rows = torch.arange(24)
    seen = conditioning(rows, step=5)
    clean = conditioning.embeddings(digits.prompts)
    assert torch.equal(seen, conditioning(rows, step=5))  # deterministic per (image, step)
    assert (not torch.equal(seen, clean)) == changes


def test_empty_caption_mix_drops_captions_to_the_empty_embedding():
    cfg = compose("train", ["experiment=smoke", *TEXT, "captions=empty_mix", "dataset.limit=200"])
    digits = load_digits(16).select(list(range(200)))
    conditioning = build_text_conditioning(cfg, digits, None)
    seen = conditioning(torch.arange(200), step=0)
    empty = conditioning.embeddings([""])[0]
    dropped = sum(torch.equal(e, empty) for e in seen)
    assert 70 <= dropped <= 130  # empty_prob = 0.5 of 200


def test_caption_attack_and_membership_use_the_training_captions(text_run, tmp_path):
    model = load_run(text_run)
    prompts = prompts_of(model, "all", ["b", "a", "b", "c", "b", "a"])
    assert list(prompts.values()) == ["b", "a", "c"]  # most duplicated first
    assert list(prompts_of(model, 2, ["b", "a", "b"]).values()) == ["b", "a"]
    cfg = compose("evaluate", [f"run_dir={text_run}", f"out_dir={tmp_path}", "attack.samples_per_prompt=3",
                               "attack.num_steps=3", "attack.min_clique=2", "attack.prompts=3", "mia.draws=1"])
    report = json.loads(evaluate_run(text_run, cfg, tmp_path).read_text())
    folders = sorted(p for p in (tmp_path / "samples").iterdir() if p.is_dir())
    assert len(folders) == 3 and all((f / "prompt.txt").read_text().startswith("a handwritten digit") for f in folders)
    assert report["counts"]["generations"] == 9 and report["counts"]["prompts"] == 3
    assert report["mia"]["members"] == 20 and report["mia"]["non_members"] == 4
    assert json.loads((tmp_path / "samples" / "meta.json").read_text())["cfg_scale"] == 3.0


def test_fine_tune_a_tiny_text_to_image_pipeline_under_mask90(tmp_path):
    """The IF-style recipe: masked input, no mask channel, the pipeline's own encoder and schedule;
    the result is an AmbientPipeline that carries the source's text encoder and samples through its
    mask. Only an unmasked fine-tune is also dropped back into the source IFPipeline (which would
    feed a masked fine-tune unmasked inputs)."""
    from diffusers import DiffusionPipeline

    from ambient.pipelines import generate_with_pipeline, make_tiny_text_pipeline

    source = make_tiny_text_pipeline(tmp_path / "source", resolution=16, channels=1)
    common = ["experiment=finetune_text", f"model.path={source}", "dataset.limit=16", "train.steps=4",
              "train.batch_size=4", "train.checkpoint_every=0", "sample.count=0"]
    run = tmp_path / "run"
    summary = train(compose("train", [*common, "corruption=mask90"]), run)
    settings = json.loads((run / "model" / "model_index.json").read_text())["ambient"]
    assert not settings["mask_channel"] and settings["corruption"]["p"] == 0.9
    assert "pipeline" not in summary and not (run / "model" / "pipeline").exists()
    pipe = DiffusionPipeline.from_pretrained(run / "model", trust_remote_code=True)
    assert type(pipe).__name__ == "AmbientPipeline"
    before = DiffusionPipeline.from_pretrained(source, use_safetensors=True).unet.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # it was trained
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt="a handwritten digit two", num_inference_steps=3, output_type="pt").images
    assert images.shape == (1, 1, 16, 16) and torch.isfinite(images).all()
    model = load_run(run)  # and the attack's loader reads the same model
    assert model.generate(1, caption="a handwritten digit two", num_steps=3).shape == (1, 1, 16, 16)

    clean = tmp_path / "clean"
    summary = train(compose("train", [*common, "corruption=none"]), clean)
    assert type(DiffusionPipeline.from_pretrained(summary["pipeline"], use_safetensors=True)).__name__ == "IFPipeline"
    exported = generate_with_pipeline(summary["pipeline"], ["a handwritten digit two"], num_inference_steps=3)
    assert exported.shape == (1, 1, 16, 16) and torch.isfinite(exported).all()
