import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from omegaconf import OmegaConf

from ambient.models import ModelConfigError, build_unet, load_pretrained_unet

TINY = OmegaConf.create({"kind": "unet", "name": "unet_tiny", "block_out_channels": [8, 16],
                         "attention_levels": [False, True], "layers_per_block": 1, "norm_num_groups": 4})


def test_mask_channel_and_resolution_check():
    unet = build_unet(TINY, channels=3, resolution=8, mask_channel=True)
    assert unet.config.in_channels == 4 and unet.config.out_channels == 3
    assert unet(torch.randn(2, 4, 8, 8), torch.tensor([0.1, 0.2])).sample.shape == (2, 3, 8, 8)
    with pytest.raises(ModelConfigError, match="dataset.resolution=9"):
        build_unet(TINY, channels=3, resolution=9, mask_channel=True)


def test_class_conditional_unet_depends_on_the_label():
    torch.manual_seed(0)
    unet = build_unet(TINY, channels=1, resolution=8, mask_channel=False, num_classes=10)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([0.3])
    a = unet(x, t, class_labels=torch.tensor([1])).sample
    b = unet(x, t, class_labels=torch.tensor([7])).sample
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("as_pipeline", [False, True])
def test_pretrained_gets_a_zero_initialised_mask_channel(tmp_path, as_pipeline):
    torch.manual_seed(0)
    original = build_unet(TINY, channels=3, resolution=8, mask_channel=False)
    torch.nn.init.normal_(original.conv_in.weight)
    target = tmp_path / ("unet" if as_pipeline else "")
    original.save_pretrained(target)
    if as_pipeline:
        DDPMScheduler().save_pretrained(tmp_path / "scheduler")
    widened = load_pretrained_unet(str(tmp_path), channels=3, mask_channel=True)
    assert widened.config.in_channels == 4
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        ref = original(x, t).sample
        for mask_value in (0.0, 1.0, 7.0):
            got = widened(torch.cat([x, torch.full((2, 1, 8, 8), mask_value)], 1), t).sample
            assert torch.allclose(got, ref, atol=1e-5)
    # the widened model round-trips through save_pretrained
    widened.save_pretrained(tmp_path / "again")
    assert UNet2DModel.from_pretrained(tmp_path / "again").config.in_channels == 4


def test_pretrained_errors_name_the_key(tmp_path):
    with pytest.raises(ModelConfigError, match="model.path"):
        load_pretrained_unet(str(tmp_path), channels=3, mask_channel=True)
    build_unet(TINY, channels=3, resolution=8, mask_channel=False).save_pretrained(tmp_path)
    with pytest.raises(ModelConfigError, match="dataset.channels"):
        load_pretrained_unet(str(tmp_path), channels=1, mask_channel=True)
