import pytest
import torch

from ambient.data import load_digits
from ambient.defenses.corruption import (
    Augment,
    BoxMask,
    CorruptedImages,
    Corruption,
    GaussianNoise,
    RandomMask,
    sampling_mask,
    shift,
)
from ambient.seeding import seeded_generator


def _data(n=64, res=16):
    return load_digits(res).select(torch.arange(n))


def test_mask_is_fixed_per_image_across_steps_and_batches():
    ds = CorruptedImages(_data(), RandomMask(0.9), seed=0, delta=0.1)
    a = ds.batch([3, 5], step=0)
    b = ds.batch([5, 3, 7], step=1234)
    assert torch.equal(a["mask"][0], b["mask"][1]) and torch.equal(a["mask"][1], b["mask"][0])
    assert torch.equal(a["mask_tilde"][0], b["mask_tilde"][1])
    assert not torch.equal(a["mask"][0], a["mask"][1])
    # a different seed gives a different corruption of the same image
    other = CorruptedImages(_data(), RandomMask(0.9), seed=1, delta=0.1).batch([3])
    assert not torch.equal(other["mask"][0], a["mask"][0])


def test_observation_holds_only_pixels_of_A():
    data = _data()
    ds = CorruptedImages(data, RandomMask(0.6), seed=0, delta=0.1)
    batch = ds.batch(range(64))
    clean = data.as_float()
    assert batch["mask"].shape == (64, 1, 16, 16)  # one mask shared by all channels
    assert torch.equal(batch["obs"], clean * batch["mask"])
    erased = 1 - batch["mask"].mean().item()
    assert abs(erased - 0.6) < 0.03
    # Ã = B·A is inside A and keeps about (1-p)(1-δ)
    assert (batch["mask_tilde"] <= batch["mask"]).all()
    assert abs(batch["mask_tilde"].mean().item() - 0.4 * 0.9) < 0.03


def test_delta_resampling_redraws_B_but_never_A():
    ds = CorruptedImages(_data(), RandomMask(0.5), seed=0, delta=0.3, resample_delta=True)
    a, b = ds.batch([0], step=1), ds.batch([0], step=2)
    assert torch.equal(a["mask"], b["mask"]) and not torch.equal(a["mask_tilde"], b["mask_tilde"])
    fixed = CorruptedImages(_data(), RandomMask(0.5), seed=0, delta=0.3)
    assert torch.equal(fixed.batch([0], 1)["mask_tilde"], fixed.batch([0], 2)["mask_tilde"])


def test_augmentation_moves_observation_and_masks_together():
    data = _data()
    plain = CorruptedImages(data, RandomMask(0.5), seed=0, delta=0.1)
    aug = CorruptedImages(data, RandomMask(0.5), seed=0, delta=0.1, augment=Augment(hflip=1.0, max_shift=3))
    clean = data.as_float()
    for step in range(5):
        p, q = plain.batch(range(8), step), aug.batch(range(8), step)
        # augmented observation is zero wherever the augmented mask is
        assert torch.equal(q["obs"] * (1 - q["mask"]), torch.zeros_like(q["obs"]))
        assert (q["mask_tilde"] <= q["mask"]).all()
        for i in range(8):
            # it is a flipped, shifted copy of the plain one: find the shift, then compare exactly
            flipped = p["obs"][i].flip(-1), p["mask"][i].flip(-1)
            ok = any(torch.equal(shift(flipped[0], dy, dx), q["obs"][i]) and
                     torch.equal(shift(flipped[1], dy, dx), q["mask"][i])
                     for dy in range(-3, 4) for dx in range(-3, 4))
            assert ok
            # and no clean pixel outside A appears: observed values come from A·x only
            assert (q["obs"][i][q["mask"][i].expand_as(q["obs"][i]) > 0].abs().sum()
                    <= (clean[i] * p["mask"][i]).abs().sum() + 1e-5)


def test_box_and_noise_operators():
    gen = seeded_generator(0, 1, 2)
    m = BoxMask(5).mask((16, 16), gen)
    assert m.sum() == 256 - 25
    rows, cols = torch.where(m[0] == 0)
    assert rows.max() - rows.min() == 4 and cols.max() - cols.min() == 4
    data = _data()
    ds = CorruptedImages(data, GaussianNoise(0.2), seed=0)
    a, b = ds.batch(range(64), 0), ds.batch(range(64), 7)
    assert torch.equal(a["obs"], b["obs"])  # the noise is fixed per image
    residual = a["obs"] - data.as_float()
    assert abs(residual.std().item() - 0.2) < 0.01 and (a["mask"] == 1).all()
    assert not Corruption().masks_pixels and RandomMask(0.5).masks_pixels


def test_sampling_mask_keeps_the_trained_fraction():
    gens = [seeded_generator(0, i) for i in range(200)]
    keep = torch.stack([sampling_mask(RandomMask(0.8), 0.1, (16, 16), g) for g in gens]).mean().item()
    assert abs(keep - 0.2 * 0.9) < 0.01


def test_cached_batches_equal_the_per_image_definition():
    """Fixed images are drawn once and indexed afterwards; every batch still equals item() per image."""
    for corruption, delta in ((RandomMask(0.9), 0.1), (BoxMask(6), 0.0), (GaussianNoise(0.2), 0.0)):
        ds = CorruptedImages(_data(), corruption, seed=3, delta=delta, with_labels=True)
        reference = CorruptedImages(_data(), corruption, seed=3, delta=delta, with_labels=True)
        for step, rows in ((0, [5, 1, 5, 63]), (7, [1, 2, 3]), (99, list(range(64)))):
            fast = ds.batch(rows, step)
            slow = [reference.item(r, step) for r in rows]
            for key in ("obs", "mask", "mask_tilde", "index"):
                assert torch.equal(fast[key], torch.stack([it[key] for it in slow])), (corruption, key)
            assert torch.equal(fast["cond"], reference.labels[rows])


AUGMENTATIONS = {  # every option of train.augment, alone and all together
    "hflip": Augment(hflip=1.0), "shift": Augment(max_shift=3), "brightness": Augment(brightness=0.3),
    "contrast": Augment(contrast=0.5), "noise": Augment(noise=0.2), "crop": Augment(crop=0.4),
    "all": Augment(hflip=0.5, max_shift=2, brightness=0.3, contrast=0.5, noise=0.2, crop=0.4),
}


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
@pytest.mark.parametrize("corruption", [RandomMask(0.6), BoxMask(6)], ids=["mask", "box"])
def test_no_clean_pixel_outside_A_reaches_the_model_under_any_augmentation(name, corruption):
    data = _data(16)
    aug = CorruptedImages(data, corruption, seed=0, delta=0.2, augment=AUGMENTATIONS[name])
    plain = CorruptedImages(data, corruption, seed=0, delta=0.2)
    # the same images with every pixel outside A replaced by noise: what the model gets must not change
    swapped = CorruptedImages(data, corruption, seed=0, delta=0.2, augment=AUGMENTATIONS[name])
    mask = plain.batch(range(16))["mask"]
    swapped._clean = data.as_float() * mask + torch.rand(16, 1, 16, 16) * 5 * (1 - mask)
    changed = False
    for step in range(4):
        a, b, p = aug.batch(range(16), step), swapped.batch(range(16), step), plain.batch(range(16), step)
        for key in ("obs", "mask", "mask_tilde"):
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(a["obs"] * (1 - a["mask"]), torch.zeros_like(a["obs"]))  # zero outside A
        assert ((a["mask"] == 0) | (a["mask"] == 1)).all() and (a["mask_tilde"] <= a["mask"]).all()
        changed |= not torch.equal(a["obs"], p["obs"])
    assert changed  # the augmentation did something


def test_photometric_augmentations_change_values_not_masks():
    data = _data(8)
    plain = CorruptedImages(data, RandomMask(0.5), seed=0).batch(range(8), 1)
    for aug in (Augment(brightness=0.3), Augment(contrast=0.5), Augment(noise=0.2)):
        q = CorruptedImages(data, RandomMask(0.5), seed=0, augment=aug).batch(range(8), 1)
        assert torch.equal(q["mask"], plain["mask"]) and torch.equal(q["mask_tilde"], plain["mask_tilde"])
        inside = plain["mask"].expand_as(plain["obs"]) > 0
        assert (q["obs"][inside] - plain["obs"][inside]).abs().mean() > 0.01
    cropped = CorruptedImages(data, RandomMask(0.5), seed=0, augment=Augment(crop=0.5)).batch(range(8), 1)
    assert abs(cropped["mask"].mean() - 0.5) < 0.1  # a nearest-neighbour zoom keeps the kept fraction about equal
