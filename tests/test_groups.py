import pytest
import torch

from pst_dist.config import ModelConfig
from pst_dist.models import build_model
from pst_dist.pst.freeze import trace_units
from pst_dist.pst.groups import layer_groups


@pytest.mark.parametrize("name,kw,chans,size", [
    ("resnet18", dict(width=0.125), 1, 28),
    ("vgg11_bn", {}, 3, 32),
    ("vit_tiny_patch16_224", dict(patch_size=4), 3, 32),
    ("mobilenetv3_small_050", {}, 3, 32),
])
def test_groups_partition_and_order(name, kw, chans, size):
    model = build_model(ModelConfig(name=name, **kw), 10, chans, size)
    groups = layer_groups(model)
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    assert len(names) == len(set(names))
    assert groups[0].name == "stem" and groups[-1].name == "head" and 3 <= len(groups) <= 6
    head = dict(model.named_parameters())
    assert any(head[n].shape[0] == 10 for n in groups[-1].param_names)  # the classifier is in the head
    gm = trace_units(model, groups, torch.zeros(2, chans, size, size))
    order = [u.group for u in gm.units if u.group is not None]
    assert order == sorted(order), f"groups not shallow to deep in execution order: {order}"
    out = model(torch.zeros(2, chans, size, size))
    assert out.shape == (2, 10)


def test_fallback_without_matcher():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    groups = layer_groups(model)
    assert [len(g.param_names) for g in groups] == [2, 2, 2]
