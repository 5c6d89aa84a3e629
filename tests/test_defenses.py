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


def test_adversarial_training_runs_with_a_frozen_stage(tmp_path, monkeypatch):
    from pst_dist import train as train_module

    cfg = load_config(None, TINY + ["--defense.kind=adv", "--defense.adv_steps=2", f"--log.run_dir={tmp_path}",
                                    "--log.tensorboard=false",
                                    '--schedule.stages=[{epochs = 1.0}, {freeze = [0, 1]}]'])
    moved = []  # per step: how far the PGD examples it trained on are from its clean batch
    pgd = train_module.pgd_examples

    def spy(model, x, *args):
        adv = pgd(model, x, *args)
        moved.append(float((adv - x).abs().max()))
        return adv

    monkeypatch.setattr(train_module, "pgd_examples", spy)
    s = train_module.train(cfg)
    assert s["steps"] > 0 and 0 <= s["final_test_acc"] <= 1
    assert len(moved) == s["steps"], "every step, frozen stage included, trains on PGD examples"
    assert all(0 < m <= cfg.defense.adv_eps + 1e-6 for m in moved), moved


def test_jpeg_squeezing_is_pil_s_codec_as_in_iss():
    """The ISS defense is a PIL JPEG round trip (Image.save quality=10, as ISS and APBench do), image by image."""
    import io

    import numpy as np
    from PIL import Image

    x = torch.randint(0, 256, (4, 3, 12, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    for chans in (1, 3):
        for i, im in enumerate(jpeg(x[:, :chans], 10)):
            buf = io.BytesIO()
            a = x[i, :chans].permute(1, 2, 0).numpy()
            Image.fromarray(a[..., 0] if chans == 1 else a).save(buf, "JPEG", quality=10)
            ref = np.array(Image.open(buf)).reshape(a.shape)
            assert torch.equal(im, torch.from_numpy(ref).permute(2, 0, 1))


def test_deprecation_warnings_from_pst_dist_code_are_errors():
    """pyproject's filterwarnings: a DeprecationWarning attributed to pst_dist code (a library's deprecated function
    warning with stacklevel=2, called from a pst_dist module) fails the test run; the same warning attributed to
    any other module does not. torchvision.io's image codecs warn from their own module (stacklevel 1), so they
    have an entry of their own."""
    import warnings

    def deprecated_api():  # a third-party function, warning at its caller as libraries do
        warnings.warn("old API", DeprecationWarning, stacklevel=2)

    def call_from(module: str) -> None:  # a call made by code of ``module``
        exec(compile("deprecated_api()", f"<{module}>", "exec"), {"__name__": module, "deprecated_api": deprecated_api})

    with pytest.raises(DeprecationWarning, match="old API"):
        call_from("pst_dist.some_module")
    with warnings.catch_warnings(record=True) as seen:
        call_from("elsewhere")
    assert [str(w.message) for w in seen] == ["old API"]
    from torchvision.io import encode_jpeg

    with pytest.raises(DeprecationWarning, match="TorchVision are deprecated"):
        encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("chans", [1, 3])
def test_ueraser_views_are_apbench_s_heavy_and_a_function_of_the_seed(chans):
    from pst_dist.defenses import _ueraser_augment, ueraser_views

    x = torch.rand(32, chans, 16, 16, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a = ueraser_views(x, 5, seed=1)
    assert torch.equal(state, torch.random.get_rng_state()), "the global generator is left as it was"
    assert all(torch.equal(p, q) for p, q in zip(a, ueraser_views(x, 5, seed=1), strict=True))
    assert not any(torch.equal(p, q) for p, q in zip(a, ueraser_views(x, 5, seed=2), strict=True))
    for i, v in enumerate(a):
        assert v.shape == x.shape and v.dtype == x.dtype and 0 <= v.min() and v.max() <= 1
        assert (v - x).abs().mean() > 0.15, "plasma brightness / contrast alone move pixels far"
        assert all(not torch.allclose(v, w) for w in a[i + 1:]), "every repeat is a view of its own"
    # APBench's defense/ueraser.py, parameter for parameter
    import kornia.augmentation as K

    bright, contrast, shuffle, trivial = _ueraser_augment(x.device).children()
    assert isinstance(bright, K.RandomPlasmaBrightness) and isinstance(contrast, K.RandomPlasmaContrast)
    assert isinstance(shuffle, K.RandomChannelShuffle) and isinstance(trivial, K.auto.TrivialAugment)
    assert bright.p == contrast.p == 1.0 and shuffle.p == 0.5
    assert "roughness=(0.3, 0.7), intensity=(0.5, 1.0)" in repr(bright) and "roughness=(0.3, 0.7)" in repr(contrast)


def test_ueraser_max_loss_is_each_image_s_worst_view_averaged():
    import contextlib

    import torch.nn.functional as F

    from pst_dist.config import LossConfig, ModelConfig
    from pst_dist.defenses import ueraser_loss, ueraser_views
    from pst_dist.models import build_model
    from pst_dist.pst.freeze import trace_units
    from pst_dist.pst.groups import layer_groups

    model = build_model(ModelConfig(width=0.125), 5, 3, 16)
    gm = trace_units(model, layer_groups(model), torch.zeros(2, 3, 16, 16))
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 5
    loss, logits, parts = ueraser_loss(gm, x, y, LossConfig(), lambda t: t, 5, contextlib.nullcontext, 5, seed=7)
    with torch.no_grad():  # train mode: batch statistics, so the same logits again
        ce = torch.stack([F.cross_entropy(model(v), y, reduction="none") for v in ueraser_views(x, 5, seed=7)])
    assert torch.allclose(loss, ce.max(0).values.mean()) and torch.allclose(parts["loss/ueraser_mean_ce"], ce.mean())
    assert loss >= ce.mean() and loss >= ce.mean(1).max()  # the max over views beats the mean (and each view's)
    assert loss.requires_grad and logits.shape == (8, 5)


def test_ueraser_trains_resumes_to_the_same_weights_and_refuses_other_loss_terms(tmp_path):
    from pst_dist.train import train

    base = [*TINY, "--data.synthetic_train=160", "--defense.kind=ueraser", "--defense.ueraser_repeats=3",
            "--defense.ueraser_repeat_epochs=1", "--log.tensorboard=false"]  # 3 steps an epoch, 3 views then 1
    full = train(load_config(None, [*base, f"--log.run_dir={tmp_path / 'full'}"]))
    assert full["steps"] > 0 and 0 <= full["final_test_acc"] <= 1
    train(load_config(None, [*base, f"--log.run_dir={tmp_path / 'part'}", "--train.checkpoint_every=1"]),
          stop_after_epochs=1)
    resumed = train(load_config(None, [*base, f"--log.run_dir={tmp_path / 'part'}"]), resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "a resume draws the same views"
    assert full["test_curve"] == resumed["test_curve"]
    pst = '--schedule.stages=[{name="warm", epochs=1}, {name="view", loss={ce=0.0, view_ce=1.0}}]'
    with pytest.raises(ConfigError, match=r"ueraser_repeats=3 .* stage\(s\) \['view'\]"):
        load_config(None, [*base, pst])
    assert load_config(None, [*base, pst, "--defense.ueraser_repeats=1"]).defense.ueraser_repeats == 1
