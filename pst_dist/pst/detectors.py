"""Cheap detectors of perturbation learning. None of them looks at the clean test set: they read a fixed probe slice
of the (poisoned) training set, and the data-side spectral check compares the training set with the validation
split."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..registry import TRIGGERS
from .freeze import GroupActivations, GroupedModel, eval_mode
from .views import apply_view


def scatter_ratio(feats: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Between-class / within-class scatter (trace ratio) of ``feats`` (N x D): high = tightly class-clustered.

    Differentiable (the activation-clustering loss penalty uses it); classes absent from the batch contribute
    nothing.
    """
    num_classes = num_classes or int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(feats.dtype)
    counts = onehot.sum(0)
    means = (onehot.T @ feats) / counts.clamp_min(1)[:, None]
    mu = feats.mean(0)
    between = (counts[:, None] * (means - mu) ** 2).sum()
    within = ((feats - means[labels]) ** 2).sum()
    return between / within.clamp_min(1e-12)


@torch.no_grad()
def probe_metrics(gm: GroupedModel, probe_x: torch.Tensor, probe_y: torch.Tensor, normalize, view: str,
                  view_strength: float = 1.0, more_views: dict[str, str] | None = None) -> dict[str, float]:
    """All detector values on the probe: raw and view accuracy, their gap, and each group's scatter ratio; for each
    ``name: view`` of ``more_views`` (a trigger's ``also`` conditions on their own views: ``also_<i>``), that view's
    accuracy and gap as ``probe_view_acc/<name>`` and ``shortcut_gap/<name>`` (each distinct view measured once,
    ``view`` too; named by condition, since a view's own string, ``randblur:2+quantize:3``, is not a name every
    tracker takes).

    ``probe_x`` is float in [0, 1]; ``normalize`` maps it to model input.
    """
    model: nn.Module = gm.model
    accuracy = lambda logits: float((logits.argmax(1) == probe_y).float().mean())  # noqa: E731
    with eval_mode(model):  # mid-epoch: frozen groups' BatchNorm stays in eval mode after (fix_frozen_bn)
        with GroupActivations(gm) as ga:
            raw_logits = model(normalize(probe_x))
        acc = accuracy(raw_logits)
        vacc = accuracy(model(normalize(apply_view(probe_x, view, view_strength))))
        out = {"probe_acc": acc, "probe_view_acc": vacc, "shortcut_gap": acc - vacc}
        measured = {view: vacc} if view_strength == 1.0 else {}  # a view is measured once, the trigger's own too
        for name, v in (more_views or {}).items():
            if v not in measured:
                measured[v] = accuracy(model(normalize(apply_view(probe_x, v))))
            out[f"probe_view_acc/{name}"], out[f"shortcut_gap/{name}"] = measured[v], acc - measured[v]
    for g, feat in sorted(ga.acts.items()):
        out[f"cluster/group_{g}"] = float(scatter_ratio(feat.double(), probe_y))
    return out


def trigger_value(kind: str, metrics: dict[str, float], group: int, view_name: str | None = None) -> float:
    """The scalar a trigger of ``kind`` (:data:`pst_dist.registry.TRIGGERS`) compares with its threshold;
    ``view_name``: a name of ``more_views`` in :func:`probe_metrics` (a trigger's ``also`` condition on its own view),
    whose accuracy and gap then stand for the trigger view's."""
    try:
        fn = TRIGGERS.load(kind)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    if view_name is not None:
        if f"shortcut_gap/{view_name}" not in metrics:
            raise KeyError(f"view {view_name!r} was not measured on the probe (probe_metrics' more_views)")
        metrics = {**metrics, "probe_view_acc": metrics[f"probe_view_acc/{view_name}"],
                   "shortcut_gap": metrics[f"shortcut_gap/{view_name}"]}
    return fn(metrics, group)


def _chunk(images: torch.Tensor) -> int:
    """Images per chunk for about 64 MB of complex128 spectra, whatever the image size."""
    return max(1, (1 << 26) // (16 * images[0].numel()))


@torch.no_grad()
def _power(images: torch.Tensor) -> torch.Tensor:
    """Mean power spectrum (C x H x W//2+1, float64; rfft2 of every channel) of uint8 images N x C x H x W, scaled
    to [0, 1], in chunks."""
    chunk = _chunk(images)
    total = sum(torch.fft.rfft2(images[i:i + chunk].double() / 255).abs().square().sum(0)
                for i in range(0, len(images), chunk))
    return total / len(images)


def _log_power(images: torch.Tensor) -> torch.Tensor:
    """log of the mean power spectrum over channels, DC left out, flattened."""
    return torch.log(_power(images).mean(0).flatten()[1:] + 1e-12)


def _classes(images: torch.Tensor, labels: torch.Tensor, ref_images: torch.Tensor,
             ref_labels: torch.Tensor, name: str = "spectral_shift") -> list[int]:
    """The classes with at least 2 images in both sets; ValueError (its message begins with ``name``, the measure
    that asked) when the images differ in shape or fewer than 2 such classes."""
    if images.shape[1:] != ref_images.shape[1:]:
        raise ValueError(f"{name}: training images {tuple(images.shape[1:])} and reference images "
                         f"{tuple(ref_images.shape[1:])} differ in shape")
    classes = [c for c in labels.unique().tolist()
               if int((labels == c).sum()) >= 2 and int((ref_labels == c).sum()) >= 2]
    if len(classes) < 2:
        raise ValueError(f"{name}: {len(classes)} classes with at least 2 images in both sets; needs 2")
    return classes


def _deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |a - b less its mean over the classes| of two classes x frequencies log spectra."""
    d = a - b
    return float((d - d.mean(0)).abs().mean())


def _spectra(images: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return torch.stack([_log_power(images[labels == c]) for c in classes])


def _subset(labels: torch.Tensor, ref_labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows of a random subset of ``labels`` with as many of each class as ``ref_labels`` (its own generator)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        rows.append(idx[torch.randperm(len(idx), generator=g)[:int((ref_labels == c).sum())]])
    return torch.cat(rows)


@torch.no_grad()
def spectral_shift(images: torch.Tensor, labels: torch.Tensor, ref_images: torch.Tensor,
                   ref_labels: torch.Tensor) -> float:
    """How differently each class of ``images`` is filtered from the same class of ``ref_images`` (both uint8
    N x C x H x W): per class, the log ratio of the two sets' mean power spectra (every frequency but DC), less its
    mean over the classes (a filter on every class alike, such as JPEG on the whole training set, makes no class-wise
    shortcut), absolute, averaged over classes and frequencies. A class-wise convolution (conv-blur) multiplies each
    class's spectrum by its own kernel's response; an additive poison of a few /255 barely moves it. The classes with
    at least 2 images in both sets count; fewer than 2 such classes: ValueError. Sampling noise shrinks with the
    reference's images per class (Fashion-MNIST, 20,000 training images against 200 validation images per class:
    clean 0.078, additive poisons 0.081-0.117, conv-blur 0.52-0.68; docs/results/pst_one_recipe.md section 33). A
    poison on part of the training set (poison.ratio < 1) moves the class means, and so the shift, less."""
    classes = _classes(images, labels, ref_images, ref_labels)
    return _deviation(_spectra(images, labels, classes), _spectra(ref_images, ref_labels, classes))


@torch.no_grad()
def spectral_noise(images: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor, seed: int = 0) -> float:
    """:func:`spectral_shift`'s sampling noise at the reference's size: the shift between ``images`` and a random
    subset of them with as many images of each class as ``ref_labels`` has (a fixed generator: the same subset on
    every rank and every resume; torch's global one untouched). Same data on both sides, so no filter: what is left
    is how far a reference of that size strays by chance (Fashion-MNIST, 200 per class: 0.058-0.067). The subset is
    drawn from the set it is compared with, so it strays a little less than an independent reference would (about
    sqrt(1 - 200/2000) as far at 200 of 2000 per class)."""
    sub = _subset(labels, ref_labels, seed)
    return spectral_shift(images, labels, images[sub], labels[sub])


@torch.no_grad()
def spectral_values(images: torch.Tensor, labels: torch.Tensor, ref_images: torch.Tensor,
                    ref_labels: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """(:func:`spectral_shift`, :func:`spectral_noise`) of the same sets, the training spectra computed once."""
    classes = _classes(images, labels, ref_images, ref_labels)
    own = _spectra(images, labels, classes)
    sub = _subset(labels, ref_labels, seed)
    return (_deviation(own, _spectra(ref_images, ref_labels, classes)),
            _deviation(own, _spectra(images[sub], labels[sub], classes)))


def over_noise(shift: float, noise: float, threshold: float) -> bool:
    """A data check's rule (``trigger.spectral_check``, ``schedule.mean_repair``): the shift exceeds ``threshold``
    times its sampling noise."""
    return shift > threshold * noise


@torch.no_grad()
def equalize_spectra(images: torch.Tensor, labels: torch.Tensor, ref_images: torch.Tensor,
                     ref_labels: torch.Tensor, max_gain: float = 4.0) -> torch.Tensor:
    """``images`` (uint8 N x C x H x W) with each class's mean power spectrum made the same class's in
    ``ref_images``: every image of class c filtered by the zero-phase gain sqrt((P_ref,c + e) / (P_c + e)) per
    channel and frequency (DC included; at most ``max_gain``; e = 1e-3 of the reference's mean power, so that nearly
    empty frequencies are not amplified), rounded back to uint8. A class-wise convolution's magnitude is undone; its
    phase (an asymmetric kernel's shift) is not. Classes with fewer than 2 images in either set are left as they
    are; fewer than 2 such classes: ValueError (:func:`spectral_shift`'s rule)."""
    out, chunk, size = images.clone(), _chunk(images), images.shape[-2:]
    for c in _classes(images, labels, ref_images, ref_labels):
        rows = (labels == c).nonzero().flatten()
        p, pr = _power(images[rows]), _power(ref_images[ref_labels == c])
        floor = 1e-3 * pr.mean()
        gain = ((pr + floor) / (p + floor)).sqrt().clamp(max=max_gain)
        for i in range(0, len(rows), chunk):
            r = rows[i:i + chunk]
            x = torch.fft.irfft2(torch.fft.rfft2(images[r].double() / 255) * gain, s=size)
            out[r] = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return out


MEAN_Z = 4.0
"""How many of its standard errors a class's mean shift at one pixel must exceed to count (:func:`mean_shift_values`)
and to be repaired (:func:`subtract_mean_shift`)."""
MEAN_ERROR_FLOOR = 0.5
"""The least standard error of a mean shift, in pixel levels: a pixel nearly constant in both sets (a black
background) does not count a rounding."""


@torch.no_grad()
def _sums(images: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """(sum, sum of squares, count) per class of ``classes`` and per channel and pixel of uint8 images, stacked
    (float64: 3 x classes x C x H x W; exact, so the sums of two disjoint parts are the whole's), in chunks."""
    out = torch.zeros(3, len(classes), *images.shape[1:], dtype=torch.float64)
    chunk = _chunk(images)
    for k, c in enumerate(classes):
        rows = (labels == c).nonzero().flatten()
        for i in range(0, len(rows), chunk):
            x = images[rows[i:i + chunk]].double()
            out[0, k] += x.sum(0)
            out[1, k] += x.square().sum(0)
        out[2, k] = len(rows)
    return out


def _moments(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, variance, count) of :func:`_sums`, in pixel levels."""
    total, square, n = sums
    return total / n, ((square - total.square() / n) / (n - 1)).clamp_min(0), n


def _significant(own: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Each class's mean shift (own less ref, less its median over the classes, the lower middle value of an even
    count: a shift shared by the classes is no class-wise shortcut, and one class's own shift does not move the
    others', as it would move their mean; with 2 or 3 classes the median is one class's own shift), in
    pixel levels, where it exceeds :data:`MEAN_Z` standard errors of the difference of the two means (at least
    :data:`MEAN_ERROR_FLOOR`); 0 elsewhere. ``own``, ``ref``: :func:`_sums`."""
    (m, v, n), (mr, vr, nr) = _moments(own), _moments(ref)
    shift = m - mr
    shift = shift - shift.median(0).values
    error = (v / n + vr / nr).sqrt().clamp_min(MEAN_ERROR_FLOOR)
    return shift * (shift.abs() > MEAN_Z * error)


def _halves(labels: torch.Tensor, ref_labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random parts of ``labels`` (its own generator), as labels with -1 outside the part (no copy of
    the images): per class, as many as ``ref_labels`` has of it (at most half the class), and the rest."""
    g = torch.Generator().manual_seed(seed)
    part, rest = torch.full_like(labels, -1), labels.clone()
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(int((ref_labels == c).sum()), len(idx) // 2)
        part[idx[:k]], rest[idx[:k]] = c, -1
    return part, rest


@torch.no_grad()
def mean_shift_values(images: torch.Tensor, labels: torch.Tensor, ref_images: torch.Tensor,
                      ref_labels: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """(shift, noise) of ``schedule.mean_repair``'s check, in pixel levels. shift: how far each class of ``images``
    (uint8 N x C x H x W) lies from the same class of ``ref_images`` where it does so unmistakably: the class-wise
    mean shift per channel and pixel that exceeds :data:`MEAN_Z` standard errors (:func:`_significant`), absolute,
    averaged over classes, channels and pixels. A class-wise additive poison (class-wise noise, LSP) or one pixel set
    per class (OPS) moves it; a sample-wise poison of zero class mean barely does. noise: the same between two
    disjoint random parts of ``images``, one with as many images of each class as ``ref_labels`` has (at most half
    the class) and the rest (a fixed generator: the same parts on every rank and resume; torch's global one
    untouched): two independent samples of the same poisoned data, which no poison can set apart; at least one
    least-significant pixel's worth (:data:`MEAN_Z` times :data:`MEAN_ERROR_FLOOR` over the classes x channels x
    pixels), so that a check whose noise finds nothing still needs a few pixels to fire. Fashion-MNIST, 200
    validation images per class: clean data 0.8 times the noise, AR 1.4, REM 2.3-3.4, OPS 8.5, EM 9-12, class-wise
    noise 12-13, LSP 15-17, conv-blur 47-53 (on its images as poisoned: a recipe whose spectral repair fires skips
    the check; docs/results/pst_one_recipe.md, section 42). The classes with at least 2 images in
    both sets count; fewer than 2 such classes: ValueError."""
    classes = _classes(images, labels, ref_images, ref_labels, "mean_shift")
    part, rest = _halves(labels, ref_labels, seed)
    part, rest = _sums(images, part, classes), _sums(images, rest, classes)
    shift = _significant(part + rest, _sums(ref_images, ref_labels, classes))
    noise = _significant(rest, part).abs().mean()
    floor = MEAN_Z * MEAN_ERROR_FLOOR / shift.numel()
    return float(shift.abs().mean()), max(float(noise), floor)


@torch.no_grad()
def subtract_mean_shift(images: torch.Tensor, labels: torch.Tensor, ref_images: torch.Tensor,
                        ref_labels: torch.Tensor) -> torch.Tensor:
    """``images`` (uint8 N x C x H x W) with each class's unmistakable mean shift against the same class of
    ``ref_images`` (:func:`_significant`) subtracted from every image of that class, rounded and clipped back to
    uint8; every other pixel as it was. What a class-wise additive poison or a one-pixel shortcut adds where it
    stands out of the images' own spread is taken away; where it hides in that spread (a class's garment pixels
    against 200 reference images) it stays. Classes with fewer than 2 images in either set are left as they are;
    fewer than 2 such classes: ValueError."""
    classes = _classes(images, labels, ref_images, ref_labels, "mean_shift")
    shift = _significant(_sums(images, labels, classes), _sums(ref_images, ref_labels, classes))
    out, chunk = images.clone(), _chunk(images)
    for k, c in enumerate(classes):
        if not bool(shift[k].any()):
            continue
        rows = (labels == c).nonzero().flatten()
        for i in range(0, len(rows), chunk):
            r = rows[i:i + chunk]
            out[r] = (images[r].double() - shift[k]).round().clamp(0, 255).to(torch.uint8)
    return out
