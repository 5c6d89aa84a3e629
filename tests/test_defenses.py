import pytest
import torch

from pst_dist.config import ConfigError, load_config
from pst_dist.data.pipeline import build_data
from pst_dist.defenses import grayscale, jpeg

from .conftest import TINY


@pytest.mark.parametrize("chans", [1, 3])
def test_jpeg_squeezing_is_lossy_deterministic_and_keeps_shape(chans):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, chans, 16, 16), dtype=torch.uint8, generator=g)
    j = jpeg(x, 10)
    assert j.shape == x.shape and j.dtype == torch.uint8 and torch.equal(j, jpeg(x, 10))
    err10 = (j.float() - x.float()).abs().mean()
    err95 = (jpeg(x, 95).float() - x.float()).abs().mean()
    assert err10 > err95 > 0  # quality 10 removes more (noise-like detail) than quality 95


def test_grayscale_squeezing():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    gray = grayscale(x)
    assert gray.shape == x.shape and torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    one = x[:, :1]
    assert torch.equal(grayscale(one), one)  # already gray


def test_defense_touches_training_images_only():
    base = build_data(load_config(None, TINY + ["--poison.kind=patch_noise"]))
    sq = build_data(load_config(None, TINY + ["--poison.kind=patch_noise", "--defense.kind=jpeg"]))
    assert torch.equal(sq.poisoned_train, jpeg(base.poisoned_train, 10))
    assert torch.equal(sq.splits.val.images, base.splits.val.images)
    assert torch.equal(sq.splits.test.images, base.splits.test.images)
    with pytest.raises(ConfigError, match="defense.kind='blur'"):
        load_config(None, ["--defense.kind=blur"])
    with pytest.raises(ConfigError, match="data.source='beton'"):
        build_data(load_config(None, ["--data.source=beton", "--data.root=/nonexistent", "--defense.kind=jpeg"]))


@pytest.mark.parametrize("chans", [1, 3])
def test_ueraser_lite_augmentation_is_heavy_per_sample_and_reproducible(chans):
    from pst_dist.data.loaders import augment_batch

    x = torch.randint(0, 256, (64, chans, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = augment_batch(x, "ueraser", torch.Generator().manual_seed(1))
    b = augment_batch(x, "ueraser", torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, "ueraser", torch.Generator().manual_seed(2)))
    light = augment_batch(x, "crop_flip", torch.Generator().manual_seed(1))
    assert (a.float() - light.float()).abs().mean() > 20  # far heavier than crop + flip
    same = x[:1].expand(64, -1, -1, -1).contiguous()  # one image, 64 times: each copy augmented differently
    out = augment_batch(same, "ueraser", torch.Generator().manual_seed(3))
    assert len({bytes(o.numpy()) for o in out}) == 64


def test_pgd_examples_stay_in_the_ball_raise_the_loss_and_leave_the_model_alone():
    import torch.nn.functional as F

    from pst_dist.config import DefenseConfig, ModelConfig
    from pst_dist.defenses import pgd_examples
    from pst_dist.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=0.125), 5, 3, 16)
    model.train()
    x, y = torch.rand(16, 3, 16, 16), torch.arange(16) % 5
    bn = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = DefenseConfig(kind="adv", adv_eps=8 / 255, adv_step=2 / 255, adv_steps=5)
    xa = pgd_examples(model, x, y, lambda t: t, cfg.adv_eps, cfg.adv_step, cfg.adv_steps)
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(xa), y) > F.cross_entropy(model(x), y)
    model.train()
    assert all(m.training for m in model.modules())  # modes given back
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, bn[k]) for k, v in model.state_dict().items())  # BatchNorm statistics untouched


def test_adversarial_training_runs_with_a_frozen_stage(tmp_path):
    from pst_dist.train import train

    cfg = load_config(None, TINY + ["--defense.kind=adv", "--defense.adv_steps=2", f"--log.run_dir={tmp_path}",
                                    "--log.tensorboard=false",
                                    '--schedule.stages=[{epochs = 1.0}, {freeze = [0, 1]}]'])
    s = train(cfg)
    assert s["steps"] > 0 and 0 <= s["final_test_acc"] <= 1
