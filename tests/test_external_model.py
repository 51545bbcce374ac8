"""Any diffusers model as the attack's target (evaluate.py model=DIR): pipelines saved locally, no hub."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DModel
from PIL import Image

from ambient.config import ConfigError, validate_evaluate
from ambient.evaluation import evaluate_model
from ambient.external import load_external
from ambient.images import to_unit
from ambient.pipelines import make_tiny_text_pipeline
from tests.helpers import compose, run_script, one_thread  # noqa: F401  (fixture)

RES = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(seed: int = 0, classes: int | None = None) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=RES, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, num_class_embeds=classes)


def _save_pipeline(path, prediction_type="epsilon", seed=0, classes=None, scheduler_class=DDIMScheduler):
    extra = {} if scheduler_class is PNDMScheduler else {"clip_sample": False}
    scheduler = scheduler_class(num_train_timesteps=1000, prediction_type=prediction_type, **extra)
    pipeline_class = DDIMPipeline if scheduler_class is DDIMScheduler else DDPMPipeline  # DDIMPipeline converts
    pipeline_class(_unet(seed, classes), scheduler).save_pretrained(path, safe_serialization=True)
    return path


def _write_images(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def digits_folders(tmp_path_factory):
    from ambient.data import load_digits

    pixels = load_digits(RES).images[:, 0].numpy()
    root = tmp_path_factory.mktemp("external")
    return _write_images(root / "train", pixels[:12]), _write_images(root / "reference", pixels[100:112])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampling_equals_the_source_pipeline(tmp_path, prediction_type):
    """Our DDIM over the model's x0 estimates is diffusers' DDIMPipeline (eta 0) from the same noise."""
    path = _save_pipeline(tmp_path / "ddim", prediction_type)
    ours = load_external(path, "ddim", num_steps=10)
    images = ours._sample([torch.Generator().manual_seed(s) for s in (3, 4)])
    theirs = DDIMPipeline.from_pretrained(path, use_safetensors=True)(
        batch_size=2, generator=[torch.Generator().manual_seed(s) for s in (3, 4)], num_inference_steps=10, eta=0.0,
        output_type="np").images
    np.testing.assert_allclose(to_unit(images).permute(0, 2, 3, 1).numpy(), theirs, atol=2e-4)
    assert ours.settings["external"]["scheduler"] == "DDIMScheduler" and not ours.settings["mask_channel"]


def test_a_bare_unet_folder_assumes_the_ddpm_schedule_and_says_so(tmp_path):
    _unet(classes=3).save_pretrained(tmp_path / "unet", safe_serialization=True)
    model = load_external(tmp_path / "unet", "ddpm_ancestral")
    assert model.settings["external"]["scheduler_assumed"] and model.settings["num_classes"] == 3
    assert model.settings["sampler"] == {"kind": "ddpm_ancestral", "num_steps": 1000, "threshold": "clip"}
    assert torch.allclose(model.scheduler.betas[[0, -1]], torch.tensor([1e-4, 0.02]))


@pytest.mark.slow
def test_evaluate_attacks_a_foreign_pipeline_and_never_mixes_models(tmp_path, digits_folders):
    train, reference = digits_folders
    model = _save_pipeline(tmp_path / "pipe")
    out = tmp_path / "eval"
    args = [f"train_data={train}", f"reference_data={reference}", f"out_dir={out}", "attack.samples_per_prompt=6",
            "attack.num_steps=4", "attack.min_clique=2", "mia.draws=1", "attack.features=random_projection",
            "attack.inpaint.samples=1", "attack.inpaint.max_images=6", "attack.inpaint.num_steps=3"]
    run_script("evaluate.py", f"model={model}", *args)  # the documented spelling, through Hydra
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["model"] == str(model) and report["counts"]["train_images"] == 12
    assert "6 images of reference_data" in report["null"]["counts"]["source"]
    assert report["mia"]["members"] == 12 and report["mia"]["non_members"] == 12
    assert report["reconstruction"]["members"] == 6
    assert len(list((out / "samples" / "unconditional").glob("*.png"))) == 6
    other = _save_pipeline(tmp_path / "other", seed=1)
    proc = run_script("evaluate.py", f"model={other}", *args, check=False)
    assert proc.returncode != 0 and "another model" in proc.stderr
    assert not (out / "report-1.json").exists()


def _cfg(model, train, *extra):
    return compose("evaluate", [f"model_path={model}", f"train_data={train}", *extra])


def test_bad_targets_name_the_key_and_write_nothing(tmp_path, digits_folders):
    train, reference = digits_folders
    out = tmp_path / "never"
    not_diffusers = tmp_path / "plain"
    not_diffusers.mkdir()
    (not_diffusers / "weights.txt").write_text("x")
    with pytest.raises(ConfigError, match="model="):
        evaluate_model(not_diffusers, train, _cfg(not_diffusers, train), out)
    pndm = _save_pipeline(tmp_path / "pndm", scheduler_class=PNDMScheduler)
    with pytest.raises(ConfigError, match="model=.*PNDMScheduler"):
        evaluate_model(pndm, train, _cfg(pndm, train), out)
    ddpm = _save_pipeline(tmp_path / "ddpm", scheduler_class=DDPMScheduler)
    rgb = _write_images(tmp_path / "rgb", np.zeros((3, RES, RES, 3), np.uint8))
    with pytest.raises(ConfigError, match="train_data=.*3 channel"):
        evaluate_model(ddpm, rgb, _cfg(ddpm, rgb), out)
    large = _write_images(tmp_path / "large", np.zeros((3, 2 * RES, 2 * RES), np.uint8))
    with pytest.raises(ConfigError, match="train_data=.*32x32.*resolution=16"):
        evaluate_model(ddpm, large, _cfg(ddpm, large), out)
    with pytest.raises(ConfigError, match="model"):
        validate_evaluate(_cfg(tmp_path / "missing", train))
    with pytest.raises(ConfigError, match="model_sampler"):
        validate_evaluate(_cfg(ddpm, train, "model_sampler=heun"))
    with pytest.raises(ConfigError, match="train_data"):
        validate_evaluate(compose("evaluate", [f"model_path={ddpm}"]))
    pickled = tmp_path / "pickled"
    _unet().save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(ConfigError, match="safetensors"):
        evaluate_model(pickled, train, _cfg(pickled, train), out)
    assert not out.exists()


def test_a_text_pipeline_is_attacked_with_the_prompts_file(tmp_path):
    pipe = make_tiny_text_pipeline(tmp_path / "if", resolution=8)
    train = _write_images(tmp_path / "train", (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8))
    with pytest.raises(ConfigError, match="prompts="):
        evaluate_model(pipe, train, _cfg(pipe, train), tmp_path / "none")
    (tmp_path / "prompts.txt").write_text("a red square\n\na blue circle\n")
    out = tmp_path / "eval"
    cfg = _cfg(pipe, train, f"prompts={tmp_path / 'prompts.txt'}", f"out_dir={out}", "attack.samples_per_prompt=2",
               "attack.num_steps=2", "attack.min_clique=2")
    report = json.loads(evaluate_model(pipe, train, cfg, out).read_text())
    assert sorted(p.name for p in (out / "samples").iterdir() if p.is_dir()) == [
        "caption_0000_a_blue_circle", "caption_0001_a_red_square"]
    assert (out / "samples" / "caption_0001_a_red_square" / "prompt.txt").read_text() == "a red square"
    assert report["counts"]["generations"] == 4 and report["mia"] is None
