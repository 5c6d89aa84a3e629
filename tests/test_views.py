"""Perturbation-suppressing views: the random blur and composed views."""

import pytest
import torch
import torch.nn.functional as F

from pst_dist.config import ConfigError, PoisonConfig, load_config, parse_view
from pst_dist.poison.shortcuts import blur_kernels
from pst_dist.pst.views import apply_view


def test_random_blur_keeps_mass_range_and_draws_one_kernel_per_image():
    x = torch.zeros(64, 3, 15, 15)
    x[:, :, 7, 7] = 1.0  # a point in the middle: the output is the image's own kernel
    torch.manual_seed(0)
    y = apply_view(x, "randblur", 2.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.allclose(y.sum((2, 3)), torch.ones(64, 3), atol=1e-4)  # normalised, nothing lost at this size
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])  # same kernel on every channel
    # a kernel per image (a few near-zero draws of both sigmas round to the same point kernel)
    assert len({tuple(k.flatten().tolist()) for k in y[:, 0].round(decimals=4)}) >= 56
    # the spread of each kernel stays within max_sigma (second moment along x and y)
    d = torch.arange(-7, 8, dtype=torch.float32)
    var_x = (y[:, 0] * d[None, None, :] ** 2).sum((1, 2))
    assert var_x.max() <= 2.0 ** 2 + 1e-3 and var_x.min() >= 0
    torch.manual_seed(0)
    assert torch.equal(apply_view(x, "randblur", 2.0), y), "deterministic given the generator state"


def test_random_blur_hides_a_classwise_blur_kernel():
    """What the view is for: after it, images blurred with two different class kernels differ far less from each
    other than the random blur differs between draws."""
    torch.manual_seed(0)
    img = torch.rand(1, 1, 28, 28).expand(256, 1, 28, 28)
    ker = blur_kernels(PoisonConfig(blur_kernel=3), 2)
    a = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="reflect"), ker[0][None, None])
    b = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="reflect"), ker[1][None, None])
    raw = (a - b).abs().mean()
    va, vb = apply_view(a, "randblur", 2.0), apply_view(b, "randblur", 2.0)
    between_draws = (va - va.roll(1, 0)).abs().mean()
    class_gap = (va.mean(0) - vb.mean(0)).abs().mean()  # the class kernel's trace left after the view
    assert raw > 0 and class_gap < 0.5 * between_draws  # at strength 0.5 they are about equal: too weak


def test_composed_views_apply_left_to_right_at_their_own_strength():
    assert parse_view("randblur:1.5+quantize:3") == [("randblur", 1.5), ("quantize", 3.0)]
    assert parse_view("blur+gray", 2.0) == [("blur", 2.0), ("gray", 2.0)]
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(apply_view(x, "blur:1+quantize:3"), apply_view(apply_view(x, "blur", 1), "quantize", 3))
    assert torch.equal(apply_view(x, "quantize", 3), apply_view(x, "quantize:3", 99))


@pytest.mark.parametrize("view, needle", [("sharpen", "unknown view 'sharpen'"), ("blur+", "unknown view ''"),
                                          ("randblur:x", "strength 'x' is not a number"),
                                          ("blur:0", "strength 0.0 must be > 0")])
def test_bad_views_are_config_errors_naming_the_part(view, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f'schedule.stages=[{{name="warm", loss={{view="{view}", view_ce=1.0}}}}]'])
    assert needle in str(e.value) and "loss.view" in str(e.value)
