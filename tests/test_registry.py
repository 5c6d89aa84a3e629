"""Every entry of every table of pst_dist.registry: its implementation imports and has the declared form.

The tests loop over the tables, so a new attack, trigger, view, bench defense or model family is checked here
without a test edit (an attack against the budget its entry declares)."""

import pytest
import torch

from pst_dist import config as C
from pst_dist.registry import ATTACKS, DEFENSES, MODEL_FAMILIES, TRACKERS, TRIGGERS, VIEWS, Registry

from .conftest import quadrant_images

TABLES = {"ATTACKS": ATTACKS, "TRIGGERS": TRIGGERS, "VIEWS": VIEWS, "DEFENSES": DEFENSES,
          "MODEL_FAMILIES": MODEL_FAMILIES, "TRACKERS": TRACKERS}
ENTRIES = [(t, n) for t, table in TABLES.items() for n in table]


@pytest.mark.parametrize("table,name", ENTRIES, ids=[f"{t}.{n}" for t, n in ENTRIES])
def test_entry_imports_and_has_a_one_line_doc(table, name):
    e = TABLES[table].entry(name)
    assert e.doc.strip() and "\n" not in e.doc, f"{table}.{name}: the doc must be one non-empty line"
    if table == "DEFENSES":
        assert e.target == "" and isinstance(e.data["run"], str) and isinstance(e.data["overrides"], list)
        return
    assert callable(TABLES[table].load(name)), f"{table}.{name}: {e.target} is not a function"
    if table == "ATTACKS":
        assert e.kind in ("cheap", "model") and e.data["budget"] in ("linf", "l2", "l0", "none")
    if table == "TRACKERS":
        assert e.data["package"] and e.data["extra"]
    if table == "MODEL_FAMILIES":
        assert e.data["prefixes"] and all(isinstance(p, str) and p for p in e.data["prefixes"])


def test_config_name_sets_are_the_registrys():
    assert C.POISONS == {"none", "file", *ATTACKS}
    assert C.MODEL_POISONS == set(ATTACKS.names("model")) and C.MODEL_POISONS
    assert C.TRIGGERS == set(TRIGGERS)
    assert set(C.VIEWS) == set(VIEWS)
    assert C.BENCH_DEFENSES == tuple(DEFENSES)
    assert set(ATTACKS.names("cheap")) | set(ATTACKS.names("model")) == set(ATTACKS)


@pytest.mark.parametrize("table", list(TABLES))
def test_an_unknown_name_errors_naming_the_known_ones(table):
    t: Registry = TABLES[table]
    for f in (t.entry, t.load):
        with pytest.raises(KeyError) as e:
            f("no_such_thing")
        assert "no_such_thing" in str(e.value) and all(repr(n) in str(e.value) for n in t), str(e.value)


def test_config_errors_name_the_known_ones():
    with pytest.raises(C.ConfigError) as e:
        C.PoisonConfig(kind="no_such_attack")
    assert all(repr(n) in str(e.value) for n in ATTACKS)
    with pytest.raises(C.ConfigError) as e:
        C.TriggerConfig(kind="no_such_trigger")
    assert all(repr(n) in str(e.value) for n in TRIGGERS)
    with pytest.raises(ValueError) as e:
        C.parse_view("blur+no_such_view")
    assert all(repr(n) in str(e.value) for n in VIEWS)


# ------------------------------------------------------------------ attacks: each within its declared budget

def _batch(chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 images of 4 classes, 16 x 16, whose class shows as a bright quadrant (so model-based attacks learn)."""
    return quadrant_images(64, chans, seed=7, low=30, high=170)


# model-based attacks: a 1/8-width ResNet-10 surrogate and a few steps (their own tests: test_attacks.py)
TINY_MODEL = ["--model.name=resnet10t", "--model.width=0.125", "--model.stem_pool=true", "--train.device=cpu",
              "--poison.batch_size=32", "--poison.steps=2", "--poison.train_steps=2", "--poison.max_rounds=1",
              "--poison.model_epochs=1", "--poison.check_size=32"]


def _attack(name: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, C.PoisonConfig]:
    from pst_dist.poison import make_poison

    if ATTACKS.entry(name).kind == "model":
        full = C.load_config(None, [f"--poison.kind={name}", *TINY_MODEL])
        return make_poison(x, y, torch.arange(len(y)), len(y), full.poison, 4, full=full)[0], full.poison
    cfg = C.PoisonConfig(kind=name)
    return make_poison(x, y, torch.arange(len(y)), len(y), cfg, 4)[0], cfg


@pytest.mark.parametrize("chans", [1, 3])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_keeps_its_declared_budget_and_is_deterministic(name, chans):
    from pst_dist.poison.budget import l2_budget, linf_levels

    torch.set_num_threads(1)
    x, y = _batch(chans)
    clean = x.clone()
    out, cfg = _attack(name, x, y)
    assert torch.equal(x, clean), f"{name} changed its input"
    assert out.dtype == torch.uint8 and out.shape == x.shape
    d = out.to(torch.int16) - x.to(torch.int16)
    assert d.any(), f"{name} changed nothing"
    budget = ATTACKS.entry(name).data["budget"]
    if budget == "linf":
        assert 0 < int(d.abs().max()) <= linf_levels(cfg.eps), f"{name}: L-inf {int(d.abs().max())}/255"
    elif budget == "l2":
        l2 = (d.double() / 255).flatten(1).norm(dim=1)
        assert float(l2.max()) <= l2_budget(cfg, tuple(x.shape[1:])) + 1e-6, f"{name}: L2 {float(l2.max())}"
    elif budget == "l0":
        assert int((d != 0).any(dim=1).flatten(1).sum(1).max()) <= 1, f"{name}: more than one pixel per image"
    else:
        assert budget == "none"
    again, _ = _attack(name, x, y)
    assert torch.equal(out, again), f"{name}: the same seed must give the same poison"


# ------------------------------------------------------------------ triggers, views, bench defenses

class _Reads(dict):
    """A metrics dict that records the keys read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: list[str] = []

    def __getitem__(self, k):
        self.read.append(k)
        return super().__getitem__(k)


# probe_metrics' keys (pst.detectors), each with its own value; 3 layer groups
METRICS = {"probe_acc": 0.71, "probe_view_acc": 0.23, "shortcut_gap": 0.48,
           "cluster/group_0": 1.5, "cluster/group_1": 2.5, "cluster/group_2": 3.5}
KNOWN_KEYS = {"shortcut_gap": "shortcut_gap", "train_acc": "probe_acc", "cluster": "cluster/group_{g}"}


@pytest.mark.parametrize("name", list(TRIGGERS))
@pytest.mark.parametrize("group", [1, 2])
def test_trigger_reads_its_key_of_the_metrics(name, group):
    from pst_dist.pst.detectors import trigger_value

    m = _Reads(METRICS)
    v = trigger_value(name, m, group)
    assert len(m.read) >= 1 and all(k in METRICS for k in m.read)
    if len(m.read) == 1:
        assert v == METRICS[m.read[0]]
        if m.read[0].startswith("cluster/"):
            assert m.read[0] == f"cluster/group_{group}", f"{name} read another group's value"
    if name in KNOWN_KEYS:
        assert m.read == [KNOWN_KEYS[name].format(g=group)]


@pytest.mark.parametrize("name", list(VIEWS))
@pytest.mark.parametrize("chans", [1, 3])
def test_view_keeps_shape_and_range(name, chans):
    from pst_dist.pst.views import apply_view

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, chans, 16, 16, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    clean = x.clone()
    for strength in (0.5, 1.0, 2.0):
        for out in (VIEWS.load(name)(x, strength), apply_view(x, name, strength)):
            assert out.shape == x.shape and out.dtype == x.dtype, name
            # up to float rounding: a Gaussian kernel's weights sum to 1 +- a few ulp (blur of all-ones: 1 + 4e-7)
            assert torch.isfinite(out).all() and out.min() >= -1e-6 and out.max() <= 1 + 1e-6, f"{name} left [0, 1]"
    assert torch.equal(x, clean), f"{name} changed its input"


def _holds(got, want) -> bool:
    """``got`` (a loaded config's value) is ``want`` (an override's), tables filled in with their defaults."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _holds(got[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_holds, got, want))
    return got == want


@pytest.mark.parametrize("name", list(DEFENSES))
def test_defense_overrides_make_a_valid_config(name):
    overrides = DEFENSES.entry(name).data["overrides"]
    raw = C.apply_overrides(C.to_dict(C.load_config(None)), list(overrides))
    cfg = C.from_dict(C.Config, raw)
    # each override took effect: the dotted key holds the value the override gives
    flat = C.to_dict(cfg)
    for o in overrides:
        key, value = o.removeprefix("--").split("=", 1)
        got = flat
        for part in key.split("."):
            got = got[int(part)] if isinstance(got, list) else got[part]
        assert _holds(got, C.tomllib.loads(f"x = {value}")["x"]), (o, got)
    assert C.to_dict(cfg) == C.to_dict(C.from_dict(C.Config, C.apply_overrides(C.to_dict(cfg), list(overrides))))


# ------------------------------------------------------------------ model families: the refactor kept every init

def _reference_build_model(cfg, num_classes, in_chans, img_size):
    """pst_dist.models.build_model as it was before MODEL_FAMILIES (commit 97e0a69), for the bit-identity test."""
    import timm
    import torch.nn as nn

    kwargs: dict = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate)
    is_resnet = cfg.name.startswith(("resnet", "resnext", "wide_resnet")) and "resnetv2" not in cfg.name
    if is_resnet and cfg.width != 1.0:
        channels = tuple(max(8, int(round(c * cfg.width))) for c in (64, 128, 256, 512))
        kwargs.update(channels=channels, stem_width=channels[0])
    if cfg.name.startswith(("vit_", "deit_")):
        kwargs.update(img_size=img_size, patch_size=cfg.patch_size)
    model = timm.create_model(cfg.name, **kwargs)
    if is_resnet and cfg.small_stem:
        out_ch = model.conv1.out_channels if isinstance(model.conv1, nn.Conv2d) else model.bn1.num_features
        model.conv1 = nn.Conv2d(in_chans, out_ch, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.bn1 = nn.BatchNorm2d(out_ch)
        model.maxpool = nn.MaxPool2d(2) if cfg.stem_pool else nn.Identity()
    return model


@pytest.mark.parametrize("kw,chans,size", [
    (dict(name="resnet18", width=0.25), 3, 32),
    (dict(name="resnet18", width=0.25, stem_pool=True), 1, 28),
    (dict(name="resnet10t", width=0.125, small_stem=False), 3, 16),
    (dict(name="vit_tiny_patch16_224", patch_size=4), 3, 32),
    (dict(name="resnetv2_18", width=0.5), 3, 16),  # excluded from the resnet family: timm's defaults
], ids=["resnet18", "resnet18-pool-gray", "resnet10t-big-stem", "vit", "resnetv2"])
def test_build_model_init_is_bit_identical_to_before_the_families(kw, chans, size):
    from pst_dist.models import build_model

    cfg = C.ModelConfig(**kw)
    torch.manual_seed(0)
    new = build_model(cfg, 10, chans, size)
    torch.manual_seed(0)
    old = _reference_build_model(cfg, 10, chans, size)
    assert repr(new) == repr(old)
    a, b = new.state_dict(), old.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_model_family_of_a_name():
    from pst_dist.models import model_family

    assert [model_family(n) for n in ("resnet18", "resnext50_32x4d", "wide_resnet50_2", "resnetv2_50", "vit_small_"
            "patch16_224", "deit_tiny_patch16_224", "vgg11_bn", "convnext_atto")] == \
        ["resnet", "resnet", "resnet", None, "vit", "vit", None, None]


def test_vit_patch_size_must_divide_the_image():
    from pst_dist.models import build_model

    with pytest.raises(C.ConfigError, match="model.patch_size=5 does not divide the image size 32"):
        build_model(C.ModelConfig(name="vit_tiny_patch16_224", patch_size=5), 10, 3, 32)


def test_a_trigger_condition_on_another_view_reads_that_views_gap():
    """trigger.also: a condition on a view of its own reads probe_metrics' values for it (named also_<i>); without
    a name, the trigger's own view; a name that was not measured is an error, not the trigger's view's gap."""
    from pst_dist.pst.detectors import trigger_value

    m = {**METRICS, "probe_view_acc/also_1": 0.61, "shortcut_gap/also_1": 0.10}
    assert trigger_value("shortcut_gap", m, 0, "also_1") == 0.10
    assert trigger_value("shortcut_gap", m, 0) == 0.48
    assert trigger_value("train_acc", m, 0, "also_1") == 0.71
    with pytest.raises(KeyError, match="also_0"):
        trigger_value("shortcut_gap", m, 0, "also_0")
