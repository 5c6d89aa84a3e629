"""Model-based attacks (EM sample- and class-wise, REM, TAP, EOT over the training augmentation) and AR's defining
property."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pst_dist.config import ConfigError, PoisonConfig, load_config
from pst_dist.matrix import cell_data_cfg
from pst_dist.poison import apply_poison, make_poison
from pst_dist.poison.shortcuts import ar_filters

from .conftest import quadrant_images

ROOT = Path(__file__).resolve().parent.parent


def tiny(kind: str, chans: int, seed: int = 0, **poison) -> tuple:
    """40 images of 4 classes whose class shows as a bright quadrant, a 1/8-width ResNet-10 surrogate."""
    x, y = quadrant_images(40, chans, seed=123, low=40, high=160)
    over = [f"--poison.kind={kind}", f"--poison.seed={seed}", "--model.name=resnet10t", "--model.width=0.125",
            "--model.stem_pool=true", "--train.device=cpu", "--poison.batch_size=16", "--poison.steps=3",
            "--poison.train_steps=3", "--poison.max_rounds=2", "--poison.model_epochs=1"]
    over += [f"--poison.{k}={v}" for k, v in poison.items()]
    return x, y, load_config(None, over)


def gen(x, y, cfg):
    """(poisoned images, what the attack did)."""
    return make_poison(x, y, torch.arange(len(y)), len(y), cfg.poison, 4, full=cfg)


@pytest.mark.parametrize("kind,extra", [("em", {}), ("em", {"granularity": '"class"'}), ("rem", {}), ("tap", {})],
                         ids=["em-sample", "em-class", "rem", "tap"])
@pytest.mark.parametrize("chans", [1, 3])
def test_model_based_budget_and_determinism(kind, extra, chans):
    torch.set_num_threads(1)
    x, y, cfg = tiny(kind, chans, **extra)
    p1, info = gen(x, y, cfg)
    assert info["attack"] == kind and info["seconds"] >= 0
    p2, _ = gen(x, y, cfg)
    assert p1.dtype == torch.uint8 and p1.shape == x.shape
    assert torch.equal(p1, p2), "same seed must give the same poison"
    d = p1.to(torch.int16) - x.to(torch.int16)
    assert 0 < int(d.abs().max()) <= 8, "L-inf budget 8/255, and the poison is not empty"
    assert not torch.equal(p1, gen(*tiny(kind, chans, seed=1, **extra))[0]), "another seed, another poison"
    if extra.get("granularity") == '"class"':  # no clipping in 40..220: the offset is the class's own noise
        for c in range(4):
            assert torch.equal(d[y == c], d[y == c][:1].expand_as(d[y == c]))
    elif kind != "tap":
        assert not torch.equal(d[y == 0][0], d[y == 0][1]), "sample-wise noise differs within a class"


def test_em_stops_at_the_target_train_error():
    torch.set_num_threads(1)
    x, y, cfg = tiny("em", 1, stop_error=0.5, max_rounds=20, steps=5, train_steps=10)
    _, info = gen(x, y, cfg)
    assert info["stop_error_reached"] and info["train_error"] <= 0.5
    assert info["rounds"] < 20
    x, y, cfg = tiny("em", 1, stop_error=0.0, max_rounds=1)  # unreachable: stops at max_rounds and says so
    _, info = gen(x, y, cfg)
    assert info["rounds"] == 1 and not info["stop_error_reached"]


def test_tap_perturbs_towards_the_next_class():
    torch.set_num_threads(1)
    x, y, cfg = tiny("tap", 3, steps=10, model_epochs=6)
    _, info = gen(x, y, cfg)
    assert info["target_success"] > 0.25, info  # chance is 0.25 at most for a wrong class


def test_tap_crafts_against_an_ensemble_of_models():
    """poison.ensemble trains that many models (member 0 is the single model's) and steps on their mean logits:
    another poison than one model's, the same for the same seed, within budget, still moved towards the next class
    on the ensemble."""
    torch.set_num_threads(1)
    x, y, cfg = tiny("tap", 1, steps=10, model_epochs=6, ensemble=2)
    p1, info = gen(x, y, cfg)
    assert torch.equal(p1, gen(x, y, cfg)[0]), "same seed must give the same poison"
    assert 0 < int((p1.to(torch.int16) - x.to(torch.int16)).abs().max()) <= 8
    assert info["target_success"] > 0.25, info
    assert not torch.equal(p1, gen(*tiny("tap", 1, steps=10, model_epochs=6))[0]), "two models, another poison"


@pytest.mark.parametrize("bad,msg", [(dict(granularity="pixel"), "granularity"), (dict(steps=0), "steps"),
                                     (dict(stop_error=1.0), "stop_error"), (dict(adv_eps=0.0), "adv_eps")])
def test_model_based_config_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        PoisonConfig(kind="em", **bad)


@pytest.mark.parametrize("kind,ensemble,msg", [("tap", 0, "poison.ensemble=0: must be >= 1"),
                                               ("em", 2, "poison.ensemble=2: only TAP .*kind='em'")])
def test_a_bad_ensemble_is_refused_naming_the_value(kind, ensemble, msg):
    with pytest.raises(ConfigError, match=msg):
        PoisonConfig(kind=kind, ensemble=ensemble)


def test_a_bench_cell_reads_a_cached_ensemble_tap_as_a_file(tmp_path):
    """A bench cell reads its cached poison as poison.kind='file' with the attack's other settings kept (they are
    the recipe recorded with the run): an ensemble TAP's settings must not make that config invalid."""
    cfg = load_config(None, ["--poison.kind=tap", "--poison.ensemble=3"])
    read = cell_data_cfg(cfg, str(tmp_path))
    assert (read.poison.kind, read.poison.ensemble, cfg.poison.kind) == ("file", 3, "tap")


@pytest.mark.multiproc
def test_em_data_parallel_on_two_processes_gives_every_rank_the_same_poison(tmp_path):
    """Two gloo ranks share the surrogate's gradients and the images' noise: both end with one poison."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "tests" / "attack_worker.py"), str(tmp_path)], check=True, env=env, timeout=300,
                   capture_output=True)
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(p0["poisoned"], p1["poisoned"])
    # the images' noise is merged across ranks whatever the surrogates did: their weights show the shared gradients
    [s0], [s1] = p0["surrogate"], p1["surrogate"]
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0), "the ranks' surrogates differ"
    assert any(not torch.equal(s0[k], v) for k, v in p0["initial"].items()), "the surrogate never trained"
    d = p0["poisoned"].to(torch.int16) - p0["clean"].to(torch.int16)
    assert 0 < int(d.abs().max()) <= 8
    assert p0["info"] == p1["info"] and p0["info"]["rounds"] >= 1


def test_poison_json_records_the_model_based_run(tmp_path):
    """`pst-dist poison` with EM on the synthetic set stores the surrogate's rounds and train error, and the
    machine's kernel choice."""
    out = tmp_path / "em"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pst_dist.cli", "poison", "--out", str(out), "--data.source=synthetic",
                        "--data.synthetic_train=64", "--data.img_size=16", "--poison.kind=em", "--poison.max_rounds=1",
                        "--poison.steps=2", "--poison.train_steps=2", "--model.name=resnet10t", "--model.width=0.125",
                        "--train.device=cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "poison.json").read_text())
    assert meta["attack"] == "em" and meta["model_based"]["rounds"] == 1 and meta["norms"]["linf"] <= 8 / 255 + 1e-9
    assert meta["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the kernels it ran on
    # the surrogate it was crafted against, and what poison.eot augments as (the bench recorded them; this did not)
    assert meta["model"]["name"] == "resnet10t" and meta["model"]["width"] == 0.125 and meta["augment"] == "crop_flip"
    assert meta["bf16"] is False  # the surrogate's autocast, which crafts another poison


def test_em_under_the_trainers_bf16_autocast():
    torch.set_num_threads(1)
    x, y, cfg = tiny("em", 3)
    cfg.train.bf16 = True
    p, info = gen(x, y, cfg)
    d = p.to(torch.int16) - x.to(torch.int16)
    assert 0 < int(d.abs().max()) <= 8 and info["rounds"] == 2
    cfg.train.bf16 = False
    assert not torch.equal(gen(x, y, cfg)[0], p), "train.bf16 did not reach the surrogate: the fp32 poison"


@pytest.mark.parametrize("kind", ["rem", "tap"])
def test_eot_changes_the_noise_deterministically(kind):
    """poison.eot augments the surrogate's (TAP: its model's) batches and sums each noise step over augmented copies:
    another poison, the same for the same seed, within budget; an augmentation it cannot differentiate through is
    refused."""
    torch.set_num_threads(1)
    x, y, cfg = tiny(kind, 1, eot=2)
    cfg.data.augment = "crop"
    p1, p2 = gen(x, y, cfg)[0], gen(x, y, cfg)[0]
    assert torch.equal(p1, p2), "same seed must give the same poison"
    assert 0 < int((p1.to(torch.int16) - x.to(torch.int16)).abs().max()) <= 8
    assert not torch.equal(p1, gen(*tiny(kind, 1))[0]), "EOT changes the noise"
    with pytest.raises(ConfigError, match="poison.eot=2 differentiates .* data.augment='ueraser' is not supported"):
        load_config(None, [f"--poison.kind={kind}", "--poison.eot=2", "--data.augment=ueraser"])


@pytest.mark.parametrize("chans", [1, 3])
def test_ar_noise_is_whitened_by_its_own_class_filter_only(chans):
    """The defining property of AR poisons: the class's AR filter (its coefficients, -1 on the pixel itself) maps
    each draw to (almost) nothing but pixel rounding; the other classes' filters leave much of it."""
    x = torch.full((40, chans, 16, 16), 128, dtype=torch.uint8)  # mid-grey: no clipping
    y = torch.arange(40) % 4
    cfg = PoisonConfig(kind="ar", seed=1)
    d = apply_poison(x, y, cfg, 4).float() - 128
    f = ar_filters(cfg, 4, chans).clone()
    f[..., 2, 2] = -1
    left = F.conv2d(d, f).pow(2).mean((-2, -1)) / d.pow(2).mean((1, 2, 3))[:, None]  # image x class filter
    own = left[torch.arange(40), y]
    other = left.scatter(1, y[:, None], float("inf")).min(1).values
    assert own.max() < 0.05, own.max()
    assert torch.equal(left.argmin(1), y), "every image is whitened most by its own class's filter"
    assert other.mean() > 5 * own.mean(), (other.mean(), own.mean())


def test_a_model_based_attack_leaves_the_callers_rng_where_it_was():
    # its surrogate seeds torch: without fork_rng a run's model init after an in-run em poison ignored train.seed
    torch.set_num_threads(1)
    x, y, cfg = tiny("em", 1)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    gen(x, y, cfg)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("kind,over,msg", [
    ("em", {"eps": 0.0015}, "poison.eps=0.0015 is below one pixel level"),
    ("tap", {"eps": 0.003}, "poison.eps=0.003 is below one pixel level"),
    ("lsp", {"l2": 0.001}, r"changed no pixel of the 40 training images: its budget \(poison.l2=0.001\)"),
    ("ar", {"l2": 0.001}, r"changed no pixel .* \(poison.l2=0.001\)"),
    ("tap", {"step_size": 0.001, "steps": 1}, r"changed no pixel .* poison.step_size=0.001 x poison.steps=1")])
def test_an_attack_whose_budget_rounds_to_no_pixel_level_is_refused_naming_it(kind, over, msg):
    # before: em / lsp / ar wrote the clean images as the poison, exit 0
    x, y, cfg = tiny(kind, 1, **over)
    with pytest.raises(ConfigError, match=msg):
        gen(x, y, cfg)


def test_conv_blur_needs_a_kernel_that_blurs():
    with pytest.raises(ConfigError, match="poison.blur_kernel=1: must be an odd number >= 3"):
        PoisonConfig(kind="conv_blur", blur_kernel=1)


@pytest.mark.parametrize("eps,levels", [(0.0337, 8), (0.0627, 16), (8 / 255, 8), (0.03, 7)])
def test_an_eps_between_pixel_levels_allows_the_level_below_it(eps, levels):
    # the attacks rounded to the nearest level: eps 8.59/255 made 9/255 perturbations, above the recorded eps
    from pst_dist.poison.budget import linf_levels

    x, y, cfg = tiny("classwise_noise", 3, eps=eps)
    assert linf_levels(eps) == levels
    assert int((gen(x, y, cfg)[0].to(torch.int16) - x.to(torch.int16)).abs().max()) == levels
