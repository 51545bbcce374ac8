"""Loss-drop (ambient/defenses/loss_drop.py): per noise level, below the running quantile is dropped;
on a real run, a planted duplicated image is dropped more often than the unique ones."""
import pytest
import torch

from ambient.config import ConfigError, validate
from ambient.defenses.loss_drop import LossDrop


def test_drops_below_the_running_quantile_of_its_own_noise_level_only_after_warmup():
    drop = LossDrop(quantile=0.25, window=400, bins=2, warmup=3, min_count=50)
    gen = torch.Generator().manual_seed(0)
    levels = torch.tensor([0.1] * 50 + [0.9] * 50)
    for step in range(3):  # low levels have losses ~1, high levels ~100
        losses = torch.cat([1 + torch.rand(50, generator=gen), 100 + 100 * torch.rand(50, generator=gen)])
        assert drop.weights(losses, levels, torch.arange(100), step).all()  # warmup: nothing dropped
    # a loss of 50 is low for the high level (dropped), high for the low level (kept)
    keep = drop.weights(torch.tensor([50.0, 50.0, 1.01, 190.0]), torch.tensor([0.9, 0.1, 0.1, 0.9]),
                        torch.tensor([7, 8, 9, 10]), step=3)
    assert keep.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert drop.dropped == {7: 1, 9: 1} and drop.seen[7] == 4 and drop.log() == {"loss_dropped": 2}
    # the step's loss is the mean of the kept, and dropped samples get no gradient
    losses = torch.tensor([50.0, 50.0, 1.01, 190.0], requires_grad=True)
    drop.reduce(losses, torch.tensor([0.9, 0.1, 0.1, 0.9]), torch.arange(4), step=4).backward()
    assert losses.grad.tolist() == pytest.approx([0.0, 0.5, 0.0, 0.5])
    restored = LossDrop(quantile=0.25, window=400, bins=2, warmup=3, min_count=50)
    restored.load_state_dict(drop.state_dict())
    assert restored.summary() == drop.summary() and all(torch.equal(a, b) for a, b in zip(restored.buffers, drop.buffers))


def test_bad_loss_drop_settings_name_the_key(smoke_cfg):
    with pytest.raises(ConfigError, match=r"train\.loss_drop\.quantile"):
        validate(smoke_cfg("train.loss_drop.quantile=1.0"))
    with pytest.raises(ConfigError, match=r"train\.loss_drop\.quantile"):
        validate(smoke_cfg("privacy=dpsgd", "train.loss_drop.quantile=0.1"))  # would void DP's per-image bound


@pytest.mark.slow
def test_a_planted_duplicate_is_dropped_more_often_than_unique_images(tmp_path, smoke_cfg, monkeypatch):
    import ambient.training as training
    from ambient.data import load_dataset

    made = []
    build = training.build_loss_drop
    monkeypatch.setattr(training, "build_loss_drop", lambda cfg: made.append(build(cfg)) or made[-1])
    cfg = smoke_cfg("dataset.limit=16", "dataset.duplicate={count: 1, times: 9}", "train.steps=80",
                    "train.checkpoint_every=0", "sample.count=0", "train.loss_drop.quantile=0.1",
                    "train.loss_drop.warmup=20", "train.loss_drop.bins=4", "train.loss_drop.min_count=16")
    summary = training.train(cfg, tmp_path)
    drop = made[0]
    data = load_dataset(cfg.dataset)
    copied = data.source_index != data.indices
    group = set(data.indices[copied].tolist()) | set(data.source_index[copied].tolist())  # the image, 9 rows
    unique = [i for i in drop.seen if i not in group]
    rate = lambda ids: sum(drop.dropped.get(i, 0) for i in ids) / sum(drop.seen[i] for i in ids)
    assert len(group) == 9 and len(unique) == 15
    # measured 0.39 vs 0.25 (about 480 appearances each side: a binomial std of about 0.02)
    assert rate(group) > rate(unique) + 0.07
    assert summary["loss_drop"]["dropped"] == sum(drop.dropped.values()) > 0
