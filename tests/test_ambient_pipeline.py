"""The trained model as a diffusers pipeline: loading three ways, one generation path, old runs,
the model card, and IF-style fine-tunes sampled and attacked through their fixed mask."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from ambient import AmbientPipeline
from ambient.pipeline import load_run
from ambient.rundir import INDEX, SETTINGS, ModelDir
from ambient.samplers import ddpm_ancestral_sample
from ambient.seeding import Stream, seeded_generator
from ambient.training import train
from tests.helpers import REPO, compose

STEPS = 4


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipe") / "run"
    train(compose("train", ["experiment=smoke", "corruption=mask60", "model.conditional=true", "dataset.limit=40",
                            "dataset.holdout=10", "train.steps=3", "train.checkpoint_every=0", "sample.count=0"]), run)
    return run


def _gens(seed, n):
    return [seeded_generator(seed, i, Stream.SAMPLE) for i in range(n)]


def test_a_run_model_is_a_diffusers_pipeline_in_a_fresh_process(class_run):
    model = load_run(class_run)
    assert isinstance(model, AmbientPipeline)
    expected = model.generate(3, seed=5, label=2, num_steps=STEPS)
    model.set_progress_bar_config(disable=True)
    called = model(batch_size=3, generator=_gens(5, 3), class_labels=2, num_inference_steps=STEPS,
                   output_type="pt").images
    assert torch.equal(called, (expected + 1) / 2)  # one generation path, bit for bit
    pil = model(batch_size=2, generator=torch.Generator().manual_seed(0), class_labels=[1, 2],
                num_inference_steps=STEPS).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    torch.save(expected, class_run.parent / "expected.pt")
    index = json.loads((class_run / "model" / INDEX).read_text())
    assert index["_class_name"] == ["pipeline_ambient", "AmbientPipeline"] and index["ambient"]["num_classes"] == 10
    assert not (class_run / "model" / SETTINGS).exists()  # no side file

    script = f"""
import torch
from diffusers import DiffusionPipeline
from ambient.seeding import Stream, seeded_generator
pipe = DiffusionPipeline.from_pretrained({str(class_run / 'model')!r}, trust_remote_code=True)
assert type(pipe).__name__ == "AmbientPipeline", type(pipe)
pipe.set_progress_bar_config(disable=True)
gens = [seeded_generator(5, i, Stream.SAMPLE) for i in range(3)]
out = pipe(batch_size=3, generator=gens, class_labels=2, num_inference_steps={STEPS}, output_type="pt").images
expected = torch.load({str(class_run.parent / 'expected.pt')!r})
assert torch.equal(out, (expected + 1) / 2)
print("same")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=class_run.parent, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-2000:]


def test_a_run_saved_before_the_pipeline_format_still_loads(class_run, tmp_path):
    """The earlier layout: unet/, scheduler/, ambient.json, no model_index.json."""
    old = tmp_path / "old"
    shutil.copytree(class_run / "model", old / "model")
    settings = json.loads((old / "model" / INDEX).read_text())["ambient"]
    (old / "model" / INDEX).unlink()
    (old / "model" / "pipeline_ambient.py").unlink()
    (old / "model" / SETTINGS).write_text(json.dumps(settings))
    assert ModelDir.of(old).path == old / "model"
    expected = load_run(class_run).generate(2, seed=1, label=4, num_steps=STEPS)
    assert torch.equal(load_run(old).generate(2, seed=1, label=4, num_steps=STEPS), expected)


def test_a_model_saved_by_the_code_before_the_pipeline_generates_what_that_code_generated(tmp_path):
    """tests/fixtures/model_before_pipeline: a real model folder written by train.py at 30edd20 (before
    AmbientPipeline: unet/ + ambient.json, hidden_precond official, class-conditional mask90), and
    what that commit's TrainedModel.generate(3, seed=7, label=l, num_steps=4) returned. Evaluations
    of old runs stay comparable only if today's generation path reproduces it."""
    from safetensors.torch import load_file

    fixture = REPO / "tests" / "fixtures" / "model_before_pipeline"
    shutil.copytree(fixture / "model", tmp_path / "model")  # loading must not need to write into it
    expected = load_file(fixture / "generations.safetensors")
    model = load_run(tmp_path)
    assert isinstance(model, AmbientPipeline)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded (a pytest -n 2 worker): CPU reductions differ in the last ulp by thread count
    try:
        for label in (0, 3):
            out = model.generate(3, seed=7, label=label, num_steps=4)
            # Bit for bit on the CPU that recorded it; another CPU's float32 convolution kernels (e.g. an AMD
            # EPYC, measured) move ~90% of the values by up to 1.3e-6. A changed generation path (schedule,
            # preconditioning, labels, seeds) moves them by orders of magnitude more than 1e-5, and a pixel
            # level (1/255 ≈ 3.9e-3) is 390× that.
            torch.testing.assert_close(out, expected[f"label{label}"], rtol=0, atol=1e-5)
            assert not torch.equal(out, model.generate(3, seed=8, label=label, num_steps=4))
    finally:
        torch.set_num_threads(threads)
    images = model(batch_size=3, generator=[torch.Generator().manual_seed(0)] * 3, class_labels=[3] * 3,
                   num_inference_steps=4, output_type="pt").images
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()


def test_saving_refuses_to_overwrite_a_pipeline(class_run, tmp_path):
    model = load_run(class_run)
    model.save_pretrained(tmp_path / "copy")
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "copy")
    again = AmbientPipeline.from_pretrained(tmp_path / "copy")
    assert torch.equal(again.generate(1, seed=0, label=1, num_steps=STEPS),
                       model.generate(1, seed=0, label=1, num_steps=STEPS))


def test_the_model_card_states_defenses_and_keeps_every_evaluation(class_run, tmp_path):
    from huggingface_hub import ModelCard

    from ambient.evaluation import evaluate_run

    card = ModelCard.load(class_run / "model" / "README.md")
    assert card.data.library_name == "diffusers" and "corruption-mask" in card.data.tags
    assert "p=0.6" in card.text and "Not evaluated yet" in card.text
    from ambient.card import write_model_card

    reports = []
    outside = tmp_path / "elsewhere"  # out_dir outside the run, deleted afterwards: still on the card
    for out in (class_run / "eval", class_run / "eval-2", outside):
        cfg = compose("evaluate", [f"run_dir={class_run}", f"out_dir={out}",
                                   "attack.samples_per_prompt=3", "attack.batch_size=4", "attack.num_steps=3",
                                   "mia.draws=1", "attack.prompts=[0,1]"])
        reports.append(json.loads(evaluate_run(class_run, cfg, out).read_text()))
    shutil.rmtree(outside)
    write_model_card(class_run / "model")
    text = (class_run / "model" / "README.md").read_text()
    assert text.count("### ") == 3 and "(eval/report.json)" in text and "(eval-2/report.json)" in text
    assert f"({outside / 'report.json'})" in text
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["pipeline_tag"] == "unconditional-image-generation"
    for report in reports:
        assert f"extracted training images (Def. 1: some generation within ℓ2 ≤ 0.15) | " \
               f"{report['extraction']['extracted']} (null " in text
        assert f"{report['mia']['auc']:.4g}" in text


# --- IF-style fine-tunes: no mask channel, but the UNet must see Ã·x_t at sampling and in the attack

@pytest.fixture(scope="module")
def masked_finetune(tmp_path_factory):
    from ambient.pipelines import make_tiny_text_pipeline

    root = tmp_path_factory.mktemp("ift")
    source = make_tiny_text_pipeline(root / "source", resolution=16, channels=1)
    run = root / "run"
    summary = train(compose("train", ["experiment=finetune_text", f"model.path={source}", "corruption=mask90",
                                      "dataset.limit=16", "train.steps=2", "train.batch_size=4",
                                      "train.checkpoint_every=0", "sample.count=0"]), run)
    return run, summary


def _record_unet_inputs(model):
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, handle


def test_an_if_style_finetune_is_sampled_through_one_fixed_mask_of_the_training_density(masked_finetune):
    run, summary = masked_finetune
    assert "pipeline" not in summary  # the source IFPipeline would sample it unmasked
    model = load_run(run)
    assert not model.settings["mask_channel"] and model.text_encoder is not None  # self-contained
    keep = (1 - 0.9) * (1 - model.settings["delta"])
    seen, handle = _record_unet_inputs(model)
    try:
        model.generate(8, seed=0, caption="a handwritten digit two", num_steps=5, cfg_scale=1.0)
    finally:
        handle.remove()
    assert len(seen) == 5
    visible = [(x != 0) for x in seen]
    assert abs(visible[0].float().mean().item() - keep) < 0.02
    assert all(torch.equal(v, visible[0]) for v in visible)  # the same mask at every step


def test_the_membership_attack_probes_an_if_style_finetune_through_its_mask(masked_finetune):
    run, _ = masked_finetune
    model = load_run(run)
    keep = (1 - 0.9) * (1 - model.settings["delta"])
    seen, handle = _record_unet_inputs(model)
    try:
        images = torch.rand(8, 1, 16, 16) * 2 - 1
        model.noise_and_denoise(images, 100, [torch.Generator().manual_seed(i) for i in range(8)],
                                cond=["a handwritten digit two"] * 8)
    finally:
        handle.remove()
    assert abs((seen[0] != 0).float().mean().item() - keep) < 0.02


def test_the_official_if_sampler_runs_on_a_finetune(masked_finetune, tmp_path):
    run, _ = masked_finetune
    model = load_run(run)
    settings = dict(model.settings)
    settings["sampler"] = {"kind": "ddpm_ancestral", "num_steps": 100, "threshold": "dynamic",
                           "hidden_readout": "epsilon", "clip_denoised": False}
    official = AmbientPipeline(model.unet, model.scheduler, model.text_encoder, model.tokenizer, ambient=settings)
    first = official.generate(2, seed=3, caption="a handwritten digit two", num_steps=10)
    assert first.shape == (2, 1, 16, 16) and torch.isfinite(first).all()
    alone = official.generate_range(1, 1, seed=3, caption="a handwritten digit two", num_steps=10)
    assert torch.allclose(first[1:], alone, atol=1e-4)  # image i depends on (seed, i), not the batch


@pytest.mark.parametrize("threshold", ["none", "clip"])
def test_the_ancestral_sampler_is_diffusers_ddpm_step(threshold):
    """One image: our posterior step equals DDPMScheduler.step on the same x0, noise and generator."""
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                              variance_type="fixed_small", clip_sample=threshold == "clip")
    target = torch.rand(1, 1, 8, 8) * 2.4 - 1.2

    def net(x, t, mask, cond):
        return target + 0.01 * x

    noise = torch.randn(1, 1, 8, 8)
    ours = ddpm_ancestral_sample(net, noise, scheduler=scheduler, num_steps=20, threshold=threshold,
                                 generators=[torch.Generator().manual_seed(7)])
    scheduler.set_timesteps(20)
    x, gen = noise.clone(), torch.Generator().manual_seed(7)
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t, None, None), t, x, generator=gen).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


def test_sampler_choices_are_validated():
    from ambient.config import ConfigError, validate

    cfg = compose("train", ["loss=ddpm", "sampler=ddpm_official"])
    validate(cfg)
    with pytest.raises(ConfigError, match="sampler.kind"):
        validate(compose("train", ["loss=edm", "sampler=ddpm_official"]))
    with pytest.raises(ConfigError, match="sampler.hidden_readout"):
        validate(compose("train", ["loss=ddpm", "sampler=ddpm_official", "sampler.hidden_readout=x1"]))


def test_a_pipeline_moved_to_bfloat16_still_samples_close_to_float32(class_run):
    model = load_run(class_run)
    full = model.generate(2, seed=0, label=1, num_steps=STEPS)
    low = load_run(class_run).to(dtype=torch.bfloat16)
    assert low.unet.dtype == torch.bfloat16
    half = low.generate(2, seed=0, label=1, num_steps=STEPS)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().mean() < 0.1  # the same images up to bfloat16 rounding
