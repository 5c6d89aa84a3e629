import pytest
import torch

from pst_dist.config import ConfigError, PoisonConfig
from pst_dist.poison import apply_poison, class_patterns


@pytest.mark.parametrize("kind", ["classwise_noise", "patch_noise"])
@pytest.mark.parametrize("chans", [1, 3])
def test_budget_determinism_classwise(kind, chans):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, chans, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 5
    cfg = PoisonConfig(kind=kind, eps=8 / 255, patch_size=3, seed=1)
    p1, p2 = apply_poison(x, y, cfg, 5), apply_poison(x, y, cfg, 5)
    assert p1.dtype == torch.uint8 and torch.equal(p1, p2)
    d = p1.to(torch.int16) - x.to(torch.int16)
    assert d.abs().max() <= 8
    assert not torch.equal(p1, apply_poison(x, y, PoisonConfig(kind=kind, eps=8 / 255, patch_size=3, seed=2), 5))
    delta = class_patterns(cfg, 5, (chans, 12, 12))
    # away from clipping, the perturbation equals the class pattern: constant within a class
    inside = (x > 10) & (x < 245)
    assert torch.equal(d[inside], delta[y].expand_as(d)[inside])
    if kind == "patch_noise":
        assert torch.equal(delta[:, :, :3, :3], delta[:, :, :1, :1].expand(5, chans, 3, 3))


@pytest.mark.parametrize("eps", [0.0, -0.1, 1.01])
def test_eps_outside_unit_interval(eps):
    with pytest.raises(ConfigError, match="poison.eps"):
        PoisonConfig(kind="patch_noise", eps=eps)


def test_none_is_identity():
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(apply_poison(x, torch.zeros(4, dtype=torch.long), PoisonConfig(), 2), x)
