"""The detectors on real trained models: a small ResNet trained on class-wise poisoned synthetic images and one trained
on the clean images, with the same seed, data and schedule.

Measured on this set-up (16 px, 10 classes, 4244 training images, 3 epochs, probe of 512 training images; VIEW is
random, three draws shown):

=====================  ============================  ===========================  ===========================
detector               poisoned model,               poisoned model,              clean model,
                       poisoned probe                clean copies of the probe    clean probe
=====================  ============================  ===========================  ===========================
probe accuracy         0.885                         0.176                        0.297
shortcut_gap, VIEW     0.506 0.521 0.469             0.045 0.053 0.033            0.104 0.113 0.096
shortcut_gap, blur     0.293                         0.049                        0.152
cluster, group 4       2.215                         0.124                        1.032
cluster, groups 0-3    0.022 0.020 0.046 0.131       0.021 0.019 0.042 0.090      0.023 0.074 0.345 0.535
=====================  ============================  ===========================  ===========================

Why these settings:

* ``shortcut_gap`` is asserted with ``VIEW`` (the view of launch/configs/bench_fmnist.toml), not the default
  ``blur``: a 1 px Gaussian blur takes most of a small clean model's above-chance accuracy on these images (0.30 ->
  0.15 on its training probe, chance 0.10; no better at 32 px), so the clean model's blur gap grows with what it
  learns (0.15 here, over 0.3 after 10 epochs on 1280 images) and sits as close to the default threshold 0.2 as the
  poisoned model's (0.29). For blur only the ranking is asserted. ``quantize`` alone does not suppress +-8/255 on
  continuous colour images (a pixel near a level boundary flips a whole level in the sign of the perturbation): gap
  0.06 on the poisoned probe.
* ``cluster`` is asserted on the last block group (4). The groups' activations are spatially mean-pooled, which
  averages a position-bound class pattern away: the stem (group 0) of either model sits at the chance level
  (K - 1) / (N - K) = 0.018, and groups 1-3 cluster *more* in the clean model (it learns shapes and colours layer
  by layer; the poisoned one reads its pattern only where the receptive field spans the image).
* ``patch_noise`` (default 8/255, 4 px patches) rather than ``classwise_noise``: a 1/8-width ResNet does not pick
  per-pixel noise out of these images (their own pixel noise is 20/255) in 3 epochs (raw accuracy 0.31 on poisoned
  images and on their clean copies alike; the trigger stays quiet); the patch pattern is learned as a shortcut
  (0.885 vs 0.176 above). No augmentation (a crop moves the pattern and slows that down); a constant lr (see ARGS).
"""

import contextlib

import pytest
import torch

from pst_dist.config import load_config
from pst_dist.data.pipeline import Normalize, build_data
from pst_dist.pst.detectors import (
    equalize_spectra,
    mean_shift_values,
    probe_metrics,
    scatter_ratio,
    spectral_noise,
    spectral_shift,
    subtract_mean_shift,
    trigger_value,
)
from pst_dist.train import train

from .conftest import TINY

THRESHOLD = 0.2  # TriggerConfig's default threshold, for shortcut_gap
MARGIN = 0.05  # every shortcut_gap value asserted clears THRESHOLD by at least this much, in its direction
VIEW = "randblur:2+quantize:3"
# cluster: the last block group's scatter ratio. The threshold lies between the clean model (1.0 on its own clean
# probe) and the poisoned one (2.2 on its poisoned probe), about their geometric mean; both must clear it by a factor
# CLUSTER_FACTOR. The control (the poisoned model on the clean copies of the same images, 0.12) lies far below.
CLUSTER_GROUP, CLUSTER_THRESHOLD, CLUSTER_FACTOR = 4, 1.5, 1.2
EPOCHS, PROBE, DRAWS = 3, 512, 3
ARGS = ["--data.source=synthetic", "--data.synthetic_train=4500", "--data.val_size=256", "--data.img_size=16",
        f"--data.probe_size={PROBE}", "--data.augment=none", "--model.width=0.125", "--train.batch_size=32",
        f"--train.epochs={EPOCHS}", "--train.lr=0.05", "--train.lr_schedule=constant", "--train.threads=1",
        "--train.device=cpu", "--train.checkpoint_every=0", "--log.progress=false", "--log.tensorboard=false",
        # stage "warm" may end early on the trigger (consulted at the ends of epochs 1 and 2: at the end of epoch 3
        # it has run its length anyway); "rest" trains exactly as "warm" does (same loss, constant lr), so the
        # switch changes no weight: the models below are the same whether or not it fired (checked: the same
        # model_checksum as with a threshold it never reaches).
        f'--schedule.stages=[{{name="warm",epochs={EPOCHS},trigger={{kind="shortcut_gap",threshold={THRESHOLD},'
        f'view="{VIEW}"}}}},{{name="rest"}}]']


@contextlib.contextmanager
def one_thread():
    """torch on one thread (train.threads=1 sets it for the process: 2 threads on 2 busy cores run several times
    slower), then the other tests' setting back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"patch_noise": run, "none": run}; a run: summary, per-epoch logs, the trained GroupedModel, data, normalize."""
    out = {}
    with one_thread():
        for kind in ("patch_noise", "none"):
            cfg = load_config(None, [*ARGS, f"--poison.kind={kind}", f"--log.run_dir={tmp_path_factory.mktemp(kind)}"])
            data = build_data(cfg)
            run = {"logs": [], "data": data, "normalize": Normalize(data.mean, data.std, torch.device("cpu"))}
            run["summary"] = train(cfg, data=data,
                                   on_epoch=lambda epoch, logs, gm, engine, run=run: (run["logs"].append(logs),
                                                                                      run.update(gm=gm)))
            out[kind] = run
    return out


def _metrics(run, clean: bool, view: str, seed: int = 0) -> dict[str, float]:
    data = run["data"]
    x = (data.splits.train.images if clean else data.poisoned_train)[:PROBE].float() / 255
    torch.manual_seed(seed)  # randblur draws from torch's global generator
    return probe_metrics(run["gm"], x, data.splits.train.labels[:PROBE], run["normalize"], view)


def test_detectors_fire_on_poisoned_probe_and_stay_quiet_on_clean(runs):
    pois, clean = runs["patch_noise"], runs["none"]
    assert not torch.equal(pois["data"].poisoned_train, pois["data"].splits.train.images)
    assert torch.equal(clean["data"].poisoned_train, clean["data"].splits.train.images)
    # VIEW is random (a blur per image): the gap of one draw varies by about +-0.03 on 512 images, so each case is
    # measured on DRAWS draws: every draw is on its side of THRESHOLD, their mean clears it by MARGIN
    cases = {"poisoned model, poisoned probe": (pois, False), "poisoned model, clean copies": (pois, True),
             "clean model, clean probe": (clean, True)}
    with one_thread():
        draws = {name: [_metrics(run, c, VIEW, seed) for seed in range(DRAWS)] for name, (run, c) in cases.items()}
        blur = {name: _metrics(run, c, "blur") for name, (run, c) in cases.items()}
    gap = lambda m: trigger_value("shortcut_gap", m, 0)
    cl = lambda m: trigger_value("cluster", m, CLUSTER_GROUP)
    for name, ms in draws.items():
        print(f"{name:31s} acc {ms[0]['probe_acc']:.3f} gap {[round(gap(m), 3) for m in ms]} blur gap "
              f"{gap(blur[name]):+.3f} cluster " + " ".join(f"{ms[0][f'cluster/group_{g}']:.3f}" for g in range(6)))
    fired, control, quiet = (ms[0] for ms in draws.values())
    # the shortcut is learned: the poisoned model knows its poisoned images and not their clean copies
    assert fired["probe_acc"] > 0.7 and control["probe_acc"] < 0.3, (fired, control)
    for name, ms in draws.items():
        gaps = [gap(m) for m in ms]
        if name == "poisoned model, poisoned probe":
            assert min(gaps) > THRESHOLD and sum(gaps) / DRAWS > THRESHOLD + MARGIN, (name, gaps)
        else:
            assert max(gaps) < THRESHOLD and sum(gaps) / DRAWS < THRESHOLD - MARGIN, (name, gaps)
    assert cl(fired) > CLUSTER_THRESHOLD * CLUSTER_FACTOR, fired
    assert cl(control) < CLUSTER_THRESHOLD / CLUSTER_FACTOR, control
    assert cl(quiet) < CLUSTER_THRESHOLD / CLUSTER_FACTOR, quiet
    # the default view ranks the two the same way, though both sit near the default threshold (see the docstring)
    assert gap(blur["poisoned model, poisoned probe"]) > gap(blur["clean model, clean probe"]) + MARGIN, blur
    # the trainer logs these same detectors
    assert set(pois["logs"][-1]) >= {"detect/shortcut_gap", f"detect/cluster/group_{CLUSTER_GROUP}"}


def test_more_views_are_measured_once_each_and_read_by_the_condition_that_names_them(runs, monkeypatch):
    """probe_metrics' more_views (a trigger's also conditions on views of their own): each name gets its view's
    accuracy and gap, the same as the view measured as the trigger's own; two names on one view share one
    measurement; trigger_value reads a condition's view by its name, the trigger's own without one."""
    pois = runs["patch_noise"]
    data = pois["data"]
    x, y = data.poisoned_train[:PROBE].float() / 255, data.splits.train.labels[:PROBE]
    import pst_dist.pst.detectors as detectors

    applied: list[str] = []
    real = detectors.apply_view
    monkeypatch.setattr(detectors, "apply_view", lambda x, v, *a: applied.append(v) or real(x, v, *a))  # a spy
    with one_thread():
        m = probe_metrics(pois["gm"], x, y, pois["normalize"], "quantize:3",
                          more_views={"also_0": "blur", "also_2": "blur", "also_3": "downup:1"})
        assert sorted(applied) == ["blur", "downup:1", "quantize:3"], applied  # blur once for its two names
        alone = {v: probe_metrics(pois["gm"], x, y, pois["normalize"], v) for v in ("blur", "downup:1")}
    for name, v in (("also_0", "blur"), ("also_2", "blur"), ("also_3", "downup:1")):
        assert m[f"probe_view_acc/{name}"] == alone[v]["probe_view_acc"], name
        assert trigger_value("shortcut_gap", m, 0, name) == alone[v]["shortcut_gap"], name
    assert trigger_value("shortcut_gap", m, 0) == m["shortcut_gap"] != m["shortcut_gap/also_3"]
    assert "shortcut_gap/also_1" not in m


def test_shortcut_gap_trigger_switches_stage_on_poisoned_data_only(runs):
    for kind, run in runs.items():
        s, logs = run["summary"], run["logs"]
        per_epoch = s["steps"] // EPOCHS
        consulted = [lg["pst/trigger_value"] for lg in logs if "pst/trigger_value" in lg]
        print(kind, "trigger values", [round(v, 3) for v in consulted], "history", s["stage_history"])
        assert len(logs) == EPOCHS and s["steps"] == EPOCHS * per_epoch
        if kind == "patch_noise":
            # quiet after epoch 1 (nothing learned yet), fires after epoch 2; "rest" then runs epoch 3
            assert s["stage_history"] == [[0, 2 * per_epoch]], s["stage_history"]
            assert consulted[0] < THRESHOLD - MARGIN < THRESHOLD + MARGIN < consulted[1], consulted
            assert logs[1]["pst/trigger_fired"] == 0.0 and "pst/trigger_fired" not in logs[0]
            assert [lg["pst/stage"] for lg in logs] == [0, 0, 1]
        else:
            assert s["stage_history"] == [], s["stage_history"]
            assert len(consulted) == 2 and max(consulted) < THRESHOLD - MARGIN, consulted
            assert not any("pst/trigger_fired" in lg for lg in logs)
            assert [lg["pst/stage"] for lg in logs] == [0, 0, 0]


def test_scatter_ratio_matches_definition_and_ignores_absent_classes():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(60, 4, generator=g, dtype=torch.double), torch.arange(60) % 5
    mu = feats.mean(0)
    between = sum(float((labels == c).sum()) * ((feats[labels == c].mean(0) - mu) ** 2).sum() for c in range(5))
    within = sum(((feats[labels == c] - feats[labels == c].mean(0)) ** 2).sum() for c in range(5))
    assert torch.isclose(scatter_ratio(feats, labels), between / within)
    assert torch.isclose(scatter_ratio(feats, labels, num_classes=100), between / within)
    clustered = feats + 5 * torch.nn.functional.one_hot(labels % 4, 4).double()
    assert scatter_ratio(clustered, labels) > scatter_ratio(feats, labels)


def test_the_spectral_check_sees_a_class_wise_convolution_not_a_filter_on_every_class_nor_additive_noise():
    """spectral_shift / spectral_noise on 512 synthetic 16 px training images against 200 validation images (measured:
    clean 1.51, conv-blur 3.84, one blur on every class 1.78, class-wise noise of +-8/255 1.52); the noise is the
    same subset's each call and of the reference's size (0 but for rounding when the reference holds every image of each
    class)."""
    import torch.nn.functional as F

    from pst_dist.config import PoisonConfig
    from pst_dist.poison.shortcuts import conv_blur

    s = build_data(load_config(None, [*TINY, "--data.synthetic_train=512", "--data.val_size=200"])).splits
    x, y, v, vy = s.train.images, s.train.labels, s.val.images, s.val.labels
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]).expand(x.shape[1], 1, 3, 3) / 16
    blurred = F.conv2d(F.pad(x.float(), (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1]).round().to(torch.uint8)
    noise = torch.randint(-8, 9, (10, *x.shape[1:]), generator=torch.Generator().manual_seed(1))
    noisy = (x.int() + noise[y]).clamp(0, 255).to(torch.uint8)

    def times(images):
        return spectral_shift(images, y, v, vy) / spectral_noise(images, y, vy)

    clean = times(x)
    assert times(conv_blur(x, y, PoisonConfig(kind="conv_blur"), 10)) > 2 * clean
    assert abs(times(blurred) - clean) < 0.4 and abs(times(noisy) - clean) < 0.2
    rng = torch.get_rng_state()
    assert spectral_noise(x, y, vy) == spectral_noise(x, y, vy) and spectral_noise(x, y, y) < 1e-9
    assert torch.equal(torch.get_rng_state(), rng)  # its own generator: a run's draws are not moved
    with pytest.raises(ValueError, match="1 classes with at least 2 images"):
        spectral_shift(x, y, v[vy == 3], vy[vy == 3])


def test_the_mean_check_sees_a_one_pixel_shortcut_and_its_repair_changes_those_pixels_alone():
    """mean_shift_values / subtract_mean_shift on 512 synthetic 16 px training images against 200 validation images
    (measured: OPS 0.496 levels, 27 times its noise 0.018; clean data 0; on these noisy images only the one pixel
    stands out of 20 reference images per class): the repair changes the pixels OPS set and no other (one class's
    shift does not leak into the others'), bringing the images more than half way back to the clean ones (mean
    |difference| 0.56 -> 0.25 levels: each class's pixel now holds the reference's mean there, not the image's own
    value), and leaves clean images as they are; a set against itself comes back pixel for pixel; a class with a
    single reference image is left as it is; torch's generator is not moved; fewer than 2 classes: ValueError
    naming the measure. On a black band (no spread) each class's white pixel is undone exactly, and the other
    classes' pixels there stay black (centred on the mean over classes, they took a tenth of it)."""
    from pst_dist.config import PoisonConfig
    from pst_dist.poison.shortcuts import ops

    s = build_data(load_config(None, [*TINY, "--data.synthetic_train=512", "--data.val_size=200"])).splits
    x, y, v, vy = s.train.images, s.train.labels, s.val.images, s.val.labels
    poisoned = ops(x, y, PoisonConfig(kind="ops"), 10)
    rng = torch.get_rng_state()
    shift, noise = mean_shift_values(poisoned, y, v, vy)
    assert shift > 0.3 and shift > 20 * noise and mean_shift_values(x, y, v, vy)[0] == 0
    assert torch.equal(torch.get_rng_state(), rng)
    repaired = subtract_mean_shift(poisoned, y, v, vy)
    assert repaired.dtype == torch.uint8 and repaired.shape == x.shape
    set_by_ops = (poisoned != x).any(1)
    assert not (repaired != poisoned).any(1)[~set_by_ops].any() and (repaired != poisoned).any(1)[set_by_ops].any()

    def off(images):
        return float((images.float() - x.float()).abs().mean())

    assert off(repaired) < 0.5 * off(poisoned)
    assert torch.equal(subtract_mean_shift(x, y, v, vy), x)
    assert torch.equal(subtract_mean_shift(poisoned, y, poisoned, y), poisoned)
    keep = (vy != 3) | (torch.arange(len(vy)) == (vy == 3).nonzero()[0])  # class 3: one reference image
    once = subtract_mean_shift(poisoned, y, v[keep], vy[keep])
    assert torch.equal(once[y == 3], poisoned[y == 3]) and not torch.equal(once[y == 2], poisoned[y == 2])
    with pytest.raises(ValueError, match="mean_shift: 1 classes with at least 2 images"):
        mean_shift_values(poisoned, y, v[vy == 3], vy[vy == 3])
    band, vband = x.clone(), v.clone()  # a black band in every image, as Fashion-MNIST's background
    band[..., :2, :], vband[..., :2, :] = 0, 0
    lit = band.clone()
    for c in range(10):  # each class's own pixel of the band set white: exactly undone, no other class touched
        lit[y == c, :, 0, c] = 255
    assert torch.equal(subtract_mean_shift(lit, y, vband, vy), band)


def test_the_spectral_repair_undoes_a_class_wise_filters_magnitude_and_leaves_a_matching_set_as_it_is():
    """equalize_spectra: what conv-blur adds to the class-wise shift against the validation split (over the clean
    images' own, sampling noise) falls by more than half (measured on these 512 synthetic images: clean 0.173,
    conv-blur 0.433, repaired 0.249); a set repaired against itself comes back pixel for pixel; a class with a single
    reference image is left as it is; the result is uint8 of the same shape."""
    from pst_dist.config import PoisonConfig
    from pst_dist.poison.shortcuts import conv_blur

    s = build_data(load_config(None, [*TINY, "--data.synthetic_train=512", "--data.val_size=200"])).splits
    x, y, v, vy = s.train.images, s.train.labels, s.val.images, s.val.labels
    blurred = conv_blur(x, y, PoisonConfig(kind="conv_blur"), 10)
    repaired = equalize_spectra(blurred, y, v, vy)
    assert repaired.dtype == torch.uint8 and repaired.shape == x.shape
    clean = spectral_shift(x, y, v, vy)
    assert spectral_shift(repaired, y, v, vy) - clean < 0.5 * (spectral_shift(blurred, y, v, vy) - clean)
    assert torch.equal(equalize_spectra(x, y, x, y), x)
    keep = (vy != 3) | (torch.arange(len(vy)) == (vy == 3).nonzero()[0])  # class 3: one reference image
    once = equalize_spectra(blurred, y, v[keep], vy[keep])
    assert torch.equal(once[y == 3], blurred[y == 3]) and not torch.equal(once[y == 2], blurred[y == 2])
