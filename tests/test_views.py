"""Perturbation-suppressing views: the random blur, plasma and composed views."""

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


def test_plasma_adds_one_smooth_bounded_field_per_image_on_every_channel():
    x = torch.full((32, 3, 32, 32), 0.5)
    torch.manual_seed(0)
    y = apply_view(x, "plasma", 2.0)
    d = y - x
    assert y.shape == x.shape and d.abs().max() <= 0.2 + 1e-6  # +-strength/10
    assert d.abs().max() > 0.1 and d.std() > 0.02  # it is not a no-op at this strength
    assert d.mean().abs() < 0.02 and d.min() < -0.05 and d.max() > 0.05  # darker and lighter, centred
    assert torch.equal(d[:, 0], d[:, 1]) and torch.equal(d[:, 0], d[:, 2])  # brightness: the same on every channel
    assert len({tuple(f.flatten().tolist()) for f in d[:, 0].round(decimals=4)}) == 32  # a field per image
    step = (d[..., 1:] - d[..., :-1]).abs().mean()
    assert step < 0.75 * (d - d.mean((2, 3), keepdim=True)).abs().mean()  # white noise: 1.4; this field: ~0.5
    torch.manual_seed(0)
    assert torch.equal(apply_view(x, "plasma", 2.0), y), "deterministic given the generator state"
    edge = apply_view(torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)]), "plasma", 5.0)
    assert edge.min() >= 0 and edge.max() <= 1  # clipped to the pixel range


def test_composed_views_apply_left_to_right_at_their_own_strength():
    assert parse_view("randblur:1.5+quantize:3") == [("randblur", 1.5), ("quantize", 3.0)]
    assert parse_view("blur+gray", 2.0) == [("blur", 2.0), ("gray", 2.0)]
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(apply_view(x, "blur:1+quantize:3"), apply_view(apply_view(x, "blur", 1), "quantize", 3))
    assert torch.equal(apply_view(x, "quantize", 3), apply_view(x, "quantize:3", 99))


@pytest.mark.parametrize("view, needle", [("emboss", "unknown view 'emboss'"), ("blur+", "unknown view ''"),
                                          ("randblur:x", "strength 'x' is not a number"),
                                          ("blur:0", "strength 0.0 must be a finite number > 0")])
def test_bad_views_are_config_errors_naming_the_part(view, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f'schedule.stages=[{{name="warm", loss={{view="{view}", view_ce=1.0}}}}]'])
    assert needle in str(e.value) and "loss.view" in str(e.value)


@pytest.mark.parametrize("chans", [1, 3])
def test_jpeg_view_is_a_batched_jpeg_close_to_pil_s(chans):
    """The jpeg view (kornia's codec on the whole batch) is JPEG-like: what it removes from an image is about what
    PIL's encoder at the same quality removes; it keeps shape, dtype and range, and compresses harder at a higher
    strength."""
    import io

    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(8, chans, 5, 5, generator=g), size=(21, 19), mode="bilinear")
    x = ((smooth + 0.1 * torch.rand(8, chans, 21, 19, generator=g)).clamp(0, 1) * 255).round() / 255  # odd sides
    v = apply_view(x, "jpeg", 1.0)  # quality 10
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all() and v.min() >= 0 and v.max() <= 1
    ref = []
    for im in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if chans == 1 else im).save(buf, "JPEG", quality=10)
        ref.append(torch.from_numpy(np.array(Image.open(buf)).reshape(im.shape)).permute(2, 0, 1))
    ref = torch.stack(ref).float() / 255
    lost = (ref - x).abs().mean()
    assert lost > 0.02 and (v - x).abs().mean() > 0.5 * lost, "changed about as much as by JPEG"
    assert (v - ref).abs().mean() < 0.5 * lost, "and in the way JPEG changes it"
    assert (apply_view(x, "jpeg", 0.2) - x).abs().mean() < (v - x).abs().mean()  # quality 50: lighter


def test_median_view_removes_a_one_pixel_shortcut_and_keeps_edges():
    """What the view is for: an OPS-like single pixel is gone after a 3x3 median, while a garment's straight edge
    (a half-plane) survives exactly; a blur of similar reach leaves a trace of the pixel and smears the edge."""
    x = torch.zeros(2, 1, 16, 16)
    x[0, 0, 5, 9] = 1.0  # one pixel
    x[1, 0, :, 8:] = 0.7  # an edge
    y = apply_view(x, "median:1")
    assert y.shape == x.shape
    assert y[0].abs().max() == 0  # the pixel is removed
    assert torch.equal(y[1], x[1])  # the edge is kept, borders included (reflect padding)
    b = apply_view(x, "blur:1")
    assert b[0].max() > 0.1 and not torch.allclose(b[1], x[1], atol=0.05)
    assert torch.equal(apply_view(x, "median:2"), apply_view(x, "median:2.2"))  # 5x5: the strength is rounded
    assert apply_view(x, "median:2")[0].abs().max() == 0


def test_sharpen_undoes_part_of_a_class_wise_blur_where_another_blur_does_not():
    """What the view is for: conv-blur's class kernels are blurs; an unsharp mask (at a moderate strength) brings a
    blurred image back towards the original, a further blur takes it away; a flat image is unchanged and the output
    stays in [0, 1]."""
    torch.manual_seed(0)
    x = F.interpolate(torch.rand(8, 1, 8, 8), size=32, mode="bilinear", align_corners=False)  # garment-like scale
    ker = blur_kernels(PoisonConfig(), 10)[3]
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), ker[None, None])
    err = lambda v: float((v - x).abs().mean())  # noqa: E731
    assert err(apply_view(blurred, "sharpen:0.5")) < 0.8 * err(blurred)
    assert err(apply_view(blurred, "blur:1")) > err(blurred)
    y = apply_view(torch.rand(4, 3, 16, 16), "sharpen:2")
    assert y.min() >= 0 and y.max() <= 1
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(apply_view(flat, "sharpen:2"), flat)
