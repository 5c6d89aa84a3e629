"""One typed config tree: nested dataclasses loaded from TOML, overridable as ``--section.key=value``.

Unknown keys and wrong types are errors that name the key. ``__post_init__`` validates values.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

from .registry import ATTACKS, DEFENSES
from .registry import TRACKERS as TRACKER_TABLE
from .registry import TRIGGERS as TRIGGER_TABLE
from .registry import VIEWS as VIEW_TABLE


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def parse_order(text: str, what: str = "unfreeze order") -> tuple[int, ...]:
    """An unfreeze order given as group indices joined by '-' ("1-0"): tune.unfreeze_orders, a search's skeleton
    tags. ConfigError naming ``what`` and the text otherwise."""
    try:
        return tuple(int(g) for g in text.split("-"))
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected group indices joined by '-', e.g. '1-0'") from None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


SEED_MAX = 2**47 - 1
"""The largest seed: the seeds pst-dist derives from one (up to ``seed * 100_003 + epoch``, a loader's per-epoch
generator) stay within torch's 64-bit generator seed; a millisecond timestamp fits."""


def _check_seed(key: str, seed: int) -> None:
    _check(0 <= seed <= SEED_MAX, f"{key}={seed}: a seed must be in [0, {SEED_MAX}]")


@dataclass
class DataConfig:
    source: str = "synthetic"
    """synthetic | fashion-mnist | cifar10 | cifar100 | imagefolder | beton (a directory written by
    ``pst-dist write-beton``: poisoned train, clean val and test, already split)"""
    root: str = ""
    """Directory of the data set files; empty = the source's default
    (fashion-mnist: /usr/share/datasets/fashion-mnist; cifar: data/<source>). For beton: the written directory."""
    loader: str = "auto"
    """auto (FFCV for a .beton, else the in-memory torch path) | ffcv | torch (a .beton decoded into memory)."""
    loader_workers: int = 2
    """Decoding workers per process: FFCV's threads for a .beton, DataLoader processes for an image folder (streamed,
    data.stream, or read into memory when it holds over 256 images; in this process if they cannot start)."""
    num_classes: int = 10
    """Classes of the synthetic set (other sources know their own)."""
    synthetic_train: int = 5000
    """Training images the synthetic source generates (its test set is a fifth of it)."""
    img_size: int = 32
    """Synthetic image side; imagefolder images are resized to this side."""
    train_size: int = 0
    """Use only the first N (shuffled) training images, at most (a recipe's cap: all of a smaller split); 0 = all.
    meta.json's ``inputs.train_images`` records how many the run trained on."""
    val_size: int = 1000
    """Clean validation images, disjoint from test. Schedules are selected on it, never on test."""
    val_from: str = "train"
    """train: carve val from the training set (before poisoning); test: carve it from the test set."""
    test_size: int = 0
    """Use only the first N test images, at most; 0 = all."""
    probe_size: int = 512
    """Images of the poisoned training set the detectors look at (a fixed slice)."""
    augment: str = "crop_flip"
    """Training augmentation: none | crop (pad-crop by side/8) | crop_flip | rrc_flip (random resized crop,
    scale 0.35-1, and flip: for ImageNet-like data) | ueraser (crop_flip, then heavy per-sample brightness /
    contrast / channel shuffle / posterise / erasing: the UEraser-lite baseline defense; torch loader only)."""
    seed: int = 0
    """Seed of the synthetic generator and of the split shuffles."""
    on_device: bool | str = "auto"
    """Keep the in-memory training set on the GPU (each batch then gathered and augmented there, no copy per batch):
    true | false | auto (on a GPU, when the set takes under a quarter of its memory). Never on the CPU; never with
    FFCV's loader (it moves its own batches). true is refused on a GPU where the training split is streamed
    (data.stream), and with data.stream=true."""
    prefetch: int = 2
    """Batches the in-memory loader prepares ahead in a background thread when the training set stays on the host
    (gathered, copied to the device and augmented there while the current batch trains); 0 = prepare each batch when
    the loop asks for it."""
    stream: bool | str = "auto"
    """data.source='imagefolder': leave the training images on disk and decode each batch's files in
    data.loader_workers DataLoader processes, ahead of the step, instead of decoding the whole split into memory
    first. true | false | auto (stream when the decoded training split, a copy per process on the node, would take
    over a quarter of the memory available). Only for a folder that holds its data as trained on (poison.kind 'none',
    no defense that rewrites the images first (jpeg, grayscale): a published protected set); the batches, and so the
    run, are those of the in-memory read."""
    verify: bool = True
    """Check stored inputs against their recorded SHA-256 when opened (a .beton directory's files, a poison store's
    array): about 1 s per GB read on one core. false skips it (the sizes and structure are still checked)."""

    def __post_init__(self) -> None:
        _check(self.source in SOURCES, f"data.source={self.source!r}: expected one of {sorted(SOURCES)}")
        _check_seed("data.seed", self.seed)
        _check(self.val_from in ("train", "test"), f"data.val_from={self.val_from!r}: expected 'train' or 'test'")
        _check(self.augment in AUGMENTS, f"data.augment={self.augment!r}: expected one of {'|'.join(AUGMENTS)}")
        _check(self.loader in ("auto", "ffcv", "torch"), f"data.loader={self.loader!r}: expected auto|ffcv|torch")
        _check(self.loader_workers >= 1, f"data.loader_workers={self.loader_workers}: must be >= 1")
        _check(self.prefetch >= 0, f"data.prefetch={self.prefetch}: must be >= 0")
        _check(isinstance(self.on_device, bool) or self.on_device == "auto",
               f"data.on_device={self.on_device!r}: expected true|false|auto")
        _check(isinstance(self.stream, bool) or self.stream == "auto",
               f"data.stream={self.stream!r}: expected true|false|auto")
        _check(self.synthetic_train >= 1, f"data.synthetic_train={self.synthetic_train}: must be >= 1")
        for key in ("train_size", "val_size", "test_size"):
            _check(getattr(self, key) >= 0, f"data.{key}={getattr(self, key)}: must be >= 0")
        _check(self.probe_size >= 1, f"data.probe_size={self.probe_size}: must be >= 1 (the detectors' images)")
        _check(self.num_classes >= 2, f"data.num_classes={self.num_classes}: must be >= 2")
        _check(self.img_size >= 8, f"data.img_size={self.img_size}: must be >= 8")


SOURCES = {"synthetic", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "beton"}
POISONS = {"none", "file", *ATTACKS}  # attacks: pst_dist.registry.ATTACKS
MODEL_POISONS = set(ATTACKS.names("model"))
AUGMENTS = ("none", "crop", "crop_flip", "rrc_flip", "ueraser")
MIXES = ("none", "mixup", "cutmix")


@dataclass
class PoisonConfig:
    kind: str = "none"
    """none | file (a poison made elsewhere, see ``path``) | an attack of ``pst_dist.registry.ATTACKS`` (each with
    its one-line description there; ``pst-dist keys`` lists them): classwise_noise, patch_noise, lsp, ar, ops,
    conv_blur, em, rem, tap, ..."""
    path: str = ""
    """kind=file: .pt (loaded with weights_only=True) or .npy, one row per image of the source's training split
    in its own order, N x C x H x W or N x H x W x C: float offsets in [0, 1] pixel units, or uint8 poisoned
    images; or K x C x H x W float offsets, one per class (Unlearnable-Examples' class-wise perturbation.pt). Its
    L-inf norm must stay within eps. Or a directory written by ``pst-dist poison`` (checked against its recorded
    norms and file hash). Or a folder of image files, one per training image named by its row (``00042.png``),
    flat, in numeric class folders (``3/00042.png``, checked against the labels) or under ``data/`` (APBench's
    export); or APBench's numpy export (poisoned_training_data.npy + poisoned_training_labels.npy); L-inf <= eps."""
    offsets: str = "signed"
    """kind=file, float offsets: signed (each pixel + round(255 * offset), clipped to 0..255) | ue (as
    Unlearnable-Examples' dataset.py applies its perturbation.pt: 255 * offset clamped to [0, 255] first, so
    negative offsets are dropped, then added, clipped and truncated to uint8; to reproduce its published runs)."""
    eps: float = 8 / 255
    """L-inf budget in [0, 1] pixel units; must lie in (0, 1]."""
    patch_size: int = 4
    """patch_noise, lsp: side of the constant patches the class pattern is made of."""
    l2: float = 0.0
    """lsp, ar: per-image L2 budget in [0, 1] pixel units; 0 = scaled from the CIFAR-10 reference to this data's
    C x H x W: lsp 6/255 * sqrt(CHW) (APBench), ar sqrt(CHW / 3072) (1.0 on 3 x 32 x 32)."""
    blur_kernel: int = 3
    """conv_blur: side of the class kernels (odd)."""
    seed: int = 0
    """The poison's own seed (class patterns; the surrogate's init and data order of em/rem/tap; the rows
    ``ratio`` poisons)."""
    ratio: float = 1.0
    """Fraction of the training images poisoned, in (0, 1]; the others stay clean. round(ratio * n) of the n
    training images: those first in a permutation of the source's rows drawn from ``seed``
    (:func:`pst_dist.poison.partial.poisoned_mask`)."""
    granularity: str = "sample"
    """em: sample (a noise per image) | class (one noise per class)."""
    steps: int = 20
    """em/rem: PGD steps on the noise per round; tap: targeted PGD steps."""
    step_size: float = 0.0
    """em/rem/tap: PGD step size in [0, 1] pixel units; 0 = eps/10 for em/rem (0.8/255), eps/4 for tap."""
    train_steps: int = 10
    """em/rem: surrogate SGD steps (batches) per round."""
    stop_error: float = 0.01
    """em/rem: stop once the surrogate's error on the poisoned training data (rem: robust error) is at most this."""
    max_rounds: int = 30
    """em/rem: at most this many rounds, whether or not stop_error was reached (the log and poison.json say)."""
    adv_eps: float = 4 / 255
    """rem: radius of the adversarial perturbation the noise must withstand (PGD, adv_steps steps)."""
    adv_steps: int = 5
    """rem: PGD steps of the inner maximisation (step 2.5 * adv_eps / adv_steps)."""
    model_epochs: int = 5
    """tap: epochs of clean training of the model it attacks."""
    batch_size: int = 256
    """em/rem/tap: batch size of the surrogate's steps and of the noise updates."""
    lr: float = 0.1
    """em/rem/tap: the surrogate's SGD learning rate (momentum 0.9, weight decay 5e-4)."""
    check_size: int = 2048
    """rem: images of the fixed subset the robust error is measured on after each round."""
    eot: int = 0
    """em/rem/tap: Expectation over Transformation (REM's reference: 5 copies; TAP's crafts through differentiable
    augmentation): the surrogate (TAP: its model) trains on batches augmented as data.augment does (crop or
    crop_flip), and each noise step sums its gradient over this many augmented copies per image (each step costs eot
    times as much); 0 = no augmentation in the attack."""
    ensemble: int = 1
    """tap: craft against this many models at once (each trained ``model_epochs`` on the clean images from its own
    init and data order; the targeted loss is taken on their mean logits), for a perturbation that transfers to a
    model trained from scratch rather than fitting one model (TAP's reference offers ``--ensemble``); each step
    costs ``ensemble`` times as much. 1 = one model, as before."""

    def __post_init__(self) -> None:
        _check(self.eot >= 0, f"poison.eot={self.eot}: must be >= 0")
        _check_seed("poison.seed", self.seed)
        _check(self.ensemble >= 1, f"poison.ensemble={self.ensemble}: must be >= 1 (the number of models TAP crafts "
                                   f"against)")
        _check(self.ensemble == 1 or self.kind in ("tap", "file"),  # file: a bench cell reading its cached TAP
               f"poison.ensemble={self.ensemble}: only TAP crafts against an ensemble (poison.kind={self.kind!r})")
        _check(self.granularity in ("sample", "class"),
               f"poison.granularity={self.granularity!r}: expected sample|class")
        _check(self.steps >= 1 and self.train_steps >= 0 and self.max_rounds >= 1 and self.adv_steps >= 1
               and self.model_epochs >= 0 and self.batch_size >= 1 and self.check_size >= 1,
               f"poison: steps={self.steps}, max_rounds={self.max_rounds}, adv_steps={self.adv_steps}, batch_size="
               f"{self.batch_size}, check_size={self.check_size} must be >= 1; train_steps={self.train_steps}, "
               f"model_epochs={self.model_epochs} >= 0")
        _check(0 <= self.step_size <= 1 and 0 < self.adv_eps <= 1 and 0 <= self.stop_error < 1 and self.lr > 0,
               f"poison: step_size={self.step_size} must lie in [0, 1], adv_eps={self.adv_eps} in (0, 1], "
               f"stop_error={self.stop_error} in [0, 1), lr={self.lr} > 0")
        _check(self.kind in POISONS, f"poison.kind={self.kind!r}: expected one of {sorted(POISONS)}")
        _check(0 < self.eps <= 1, f"poison.eps={self.eps}: must lie in (0, 1]")
        _check(0 < self.ratio <= 1, f"poison.ratio={self.ratio}: must lie in (0, 1] (the fraction of the training "
               f"images poisoned)")
        _check(self.offsets in ("signed", "ue"), f"poison.offsets={self.offsets!r}: expected signed|ue")
        _check(self.patch_size >= 1, f"poison.patch_size={self.patch_size}: must be >= 1")
        _check(self.l2 >= 0, f"poison.l2={self.l2}: must be >= 0 (0 = the default for the data size)")
        _check(self.blur_kernel >= 3 and self.blur_kernel % 2 == 1,
               f"poison.blur_kernel={self.blur_kernel}: must be an odd number >= 3 (1 is no blur)")
        _check((self.kind == "file") == bool(self.path),
               f"poison.path={self.path!r}: set it exactly when poison.kind='file' (kind={self.kind!r})")


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Any timm model name (resnet18, vgg11_bn, vit_tiny_patch16_224, ...)."""
    small_stem: bool = True
    """ResNet: 3x3 stride-1 stem without max-pool, for 28-32 px inputs."""
    stem_pool: bool = False
    """ResNet with small_stem: keep a 2x max-pool after the stem (4x cheaper, for fast CPU runs)."""
    width: float = 1.0
    """ResNet: channel multiplier on (64, 128, 256, 512)."""
    patch_size: int = 4
    """ViT: patch side (the image size comes from data)."""
    block_groups: int = 4
    """Most layer groups the blocks between stem and head are merged into (ViT: chunks of blocks)."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name is empty")
        _check(self.width > 0, f"model.width={self.width}: must be > 0")
        _check(self.block_groups >= 1, f"model.block_groups={self.block_groups}: must be >= 1")
        _check(0 <= self.drop_rate < 1, f"model.drop_rate={self.drop_rate}: must lie in [0, 1)")


TRIGGERS = set(TRIGGER_TABLE)  # pst_dist.registry.TRIGGERS
TRIGGER_OTHERWISE = ("next", "stay")


VIEWS = tuple(VIEW_TABLE)  # pst_dist.registry.VIEWS


def parse_view(view: str, strength: float = 1.0) -> list[tuple[str, float]]:
    """``"randblur:1.5+quantize:3"`` -> [("randblur", 1.5), ("quantize", 3.0)]: views applied left to right, each
    at its own strength (``name:strength``) or at ``strength``. Raises ValueError naming a bad part. (Here, not in
    pst.views, so that reading a config needs no torch.)"""
    out = []
    for part in view.split("+"):
        name, _, st = part.strip().partition(":")
        if name not in VIEWS:
            raise ValueError(f"unknown view {name!r} in {view!r}: expected one of {sorted(VIEWS)}, joined by '+'")
        try:
            s = float(st) if st else float(strength)
        except ValueError:
            raise ValueError(f"view {part!r}: strength {st!r} is not a number") from None
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"view {part!r}: strength {s} must be a finite number > 0")
        out.append((name, s))
    return out


def check_eval_views(key: str, views) -> None:
    """Test-time views (``key``: where they were read): a list of deterministic views (ConfigError otherwise)."""
    _check(isinstance(views, list) and all(isinstance(v, str) for v in views),
           f"{key}={views!r}: expected a list of views (e.g. [\"blur:0.7\"])")
    for i, view in enumerate(views):
        for name, _ in _check_view(f"{key}[{i}]", view):
            _check(not VIEW_TABLE[name].data.get("random"), f"{key}[{i}]={view!r}: {name!r} is random; an "
                   f"evaluation must not draw from the training run's generator (e.g. 'blur:0.7')")


def _check_view(key: str, view: str, strength: float = 1.0) -> list[tuple[str, float]]:
    try:
        return parse_view(view, strength)
    except ValueError as e:
        raise ConfigError(f"{key}={view!r}: {e}") from None


@dataclass
class TriggerCondition:
    """One condition of a trigger: a detector, its threshold and view (a trigger's own, or one of its ``also``)."""

    kind: str = "shortcut_gap"
    """shortcut_gap: acc(probe) - acc(view(probe)) > threshold; train_acc: probe acc > threshold;
    cluster: between/within scatter ratio of a group's activations on the probe > threshold."""
    threshold: float = 0.2
    """The value above which the trigger fires."""
    group: int = 0
    """cluster: which layer group's activations to measure."""
    view: str = "blur"
    """shortcut_gap: the perturbation-suppressing view of the probe (at strength 1 unless the view names its own,
    e.g. ``"randblur:1.5+quantize:3"``)."""
    _where: typing.ClassVar[str] = "trigger.also[]."

    def __post_init__(self) -> None:
        _check(self.kind in TRIGGERS, f"{self._where}kind={self.kind!r}: expected one of {sorted(TRIGGERS)}")
        _check_view(f"{self._where}view", self.view)
        _check(self.group >= 0, f"{self._where}group={self.group}: must be >= 0")


@dataclass
class TriggerConfig(TriggerCondition):
    """A stage's trigger: its own condition (kind, threshold, group, view), what an unfired stage does, and more
    conditions."""

    otherwise: str = "next"
    """What happens when the stage reaches its planned length (epochs / steps) without its trigger having fired:
    ``next``: the next stage starts; ``stay``: the detector found nothing to suppress, so the stage goes on to the
    end of the run (with ``train.lr_span = "stage"`` its learning-rate shape, warm-up steps included, starting again
    over the remaining steps; ``pst/stayed`` logged there) and is still consulted: when it fires later, the next
    stages start there, while they still get their planned lengths (``Schedule.fire_deadline``; after it the stage
    stays to the end)."""
    also: list[TriggerCondition] = field(default_factory=list)
    """More conditions, each with its own kind, threshold and view: the trigger fires when its own value or any of
    theirs crosses its threshold (e.g. a gap on a blur view and the scatter ratio of a deep group, each on its own
    scale; the values a run logs under detect/ are where thresholds are read off: launch/trigger_screen.py)."""
    spectral_check: float = 0.0
    """With ``otherwise = "stay"``: a check of the data before training (0: none). It measures how differently the
    training images of each class are filtered from the validation split's (``detect/spectral_shift``: the log ratio
    of the two mean power spectra, class by class, less its mean over the classes; :mod:`pst_dist.pst.detectors`)
    and that measure's sampling noise at the validation split's size (``detect/spectral_noise``: the same between
    the training set and a random subset of it as large). When the shift exceeds ``spectral_check`` times the noise,
    the training set carries a class-wise filter (a convolution poison such as conv-blur, whose shortcut no view
    undoes and the gap detector does not see), and the stage does not stay: unfired, it ends at its planned length,
    as with ``otherwise = "next"`` (a last stage never stays: not checked). A resume takes the values the run started
    with (meta.json's inputs). Needs the training images in memory and a validation split (data.val_size). A poison
    on part of the training set (poison.ratio < 1) moves the shift less; the threshold was read at ratio 1.
    Fashion-MNIST, 200 validation images per class: clean data 1.2 times the noise, additive poisons 1.3-2.0 (OPS
    the highest), conv-blur 8.2-10.2 (docs/results/pst_one_recipe.md, section 33)."""
    stay_ce: float = 1.0
    """With ``otherwise = "stay"``: the weight of raw cross-entropy (``loss.ce``) past the planned length, as a
    fraction of the stage's own (1: unchanged; 0: the views' losses alone). A stage that stays has found nothing to
    suppress; a poison its detector misses can still be learnt from the raw images there, late, as the learning rate
    falls. Refused where it could never apply: on the last stage and on a stage without a planned length."""
    spectral_repair: bool = False
    """With ``spectral_check``: when the check finds a class-wise filter, the run also trains on the training images
    with each class's mean power spectrum made the validation split's (a zero-phase gain per class and frequency, at
    most 4: the filter's magnitude undone, its phase not; :func:`pst_dist.pst.detectors.equalize_spectra`), from the
    first step to the last, probe and logged sample grid included; the stages run as the check decided. Fashion-
    MNIST conv-blur, 3 seeds: docs/results/pst_one_recipe.md, section 34."""
    _where: typing.ClassVar[str] = "trigger."

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.otherwise in TRIGGER_OTHERWISE,
               f"trigger.otherwise={self.otherwise!r}: expected one of {sorted(TRIGGER_OTHERWISE)}")
        _check(self.spectral_check >= 0, f"trigger.spectral_check={self.spectral_check}: must be >= 0 (0: no check)")
        _check(self.spectral_check == 0 or self.otherwise == "stay",
               f"trigger.spectral_check={self.spectral_check} with trigger.otherwise={self.otherwise!r}: the check "
               f"decides whether an unfired stage stays, so it needs otherwise = \"stay\"")
        _check(self.stay_ce >= 0, f"trigger.stay_ce={self.stay_ce}: must be >= 0")
        _check(self.stay_ce == 1 or self.otherwise == "stay",
               f"trigger.stay_ce={self.stay_ce} with trigger.otherwise={self.otherwise!r}: it weighs the raw "
               f"cross-entropy of a stage that stays, so it needs otherwise = \"stay\"")
        _check(not self.spectral_repair or self.spectral_check > 0,
               f"trigger.spectral_repair={self.spectral_repair} with trigger.spectral_check={self.spectral_check}: "
               f"the repair follows the check's finding; set spectral_check (e.g. 4)")


@dataclass
class LossConfig:
    ce: float = 1.0
    """Weight of cross-entropy on the raw (poisoned) batch."""
    view_ce: float = 0.0
    """Weight of cross-entropy on the perturbation-suppressing view of the batch."""
    consistency: float = 0.0
    """Weight of KL(p(view) || p(raw)) with the view's prediction as a fixed target."""
    cluster_penalty: float = 0.0
    """Weight of the between/within scatter ratio of ``cluster_group``'s pooled activations."""
    cluster_group: int = 0
    """Group whose activation clustering the penalty targets."""
    label_smoothing: float = 0.0
    """Label smoothing of both cross-entropy terms."""
    view: str = "blur"
    """The perturbation-suppressing view used by view_ce and consistency: blur | randblur | downup | gray | jpeg |
    median | plasma | quantize | sharpen, or several joined by ``+`` (applied left to right), each optionally at its
    own strength (``"randblur:1.5+quantize:3"``)."""
    view_strength: float = 1.0
    """blur: sigma in pixels; downup: factor; jpeg: quality = 10/strength; plasma: +-strength/10... see pst.views."""
    mix: str = "none"
    """Mix each training batch before the loss: none | mixup (each image blended with its neighbour in the batch, by
    a weight drawn from Beta(mix_alpha, mix_alpha)) | cutmix (a box of its neighbour pasted in, its area drawn so);
    torchvision's MixUp / CutMix, their random draws a function of (seed, epoch, step, rank). The cross-entropy
    terms then train on the mixed labels, the view's on the view of the mixed batch; train accuracy is read against
    each image's own label."""
    mix_alpha: float = 1.0
    """The Beta distribution's parameter for ``mix``."""

    def __post_init__(self) -> None:
        _check(self.mix in MIXES, f"loss.mix={self.mix!r}: expected {' | '.join(MIXES)}")
        _check(self.mix_alpha > 0, f"loss.mix_alpha={self.mix_alpha}: must be > 0")
        _check(self.mix == "none" or self.cluster_penalty == 0, f"loss.mix={self.mix!r} with loss.cluster_penalty="
               f"{self.cluster_penalty}: the penalty needs each image's own label, which mixing blends")
        for key in ("ce", "view_ce", "consistency", "cluster_penalty"):
            _check(getattr(self, key) >= 0, f"loss.{key}={getattr(self, key)}: must be >= 0")
        _check(self.ce + self.view_ce + self.consistency > 0, "loss: ce, view_ce and consistency are all 0")
        _check(0 <= self.label_smoothing < 1, f"loss.label_smoothing={self.label_smoothing}: must lie in [0, 1)")
        _check(self.view_strength > 0, f"loss.view_strength={self.view_strength}: must be > 0")
        _check_view("loss.view", self.view, self.view_strength)


@dataclass
class StageConfig:
    name: str = ""
    """A label for logs."""
    epochs: float = 0.0
    """Fixed length in epochs (fractions allowed); 0 = use steps, or run to the end if both are 0."""
    steps: int = 0
    """Fixed length in optimizer steps, for a stage whose epochs is 0 (a stage gives one of them, not both)."""
    trigger: TriggerConfig | None = None
    """End the stage early when this detector fires; epochs/steps is then the maximum (unless the trigger's
    ``otherwise = "stay"``: then it is the length after which an unfired stage goes on to the run's end)."""
    min_epochs: float = 0.0
    """The trigger is not consulted before this many epochs of the stage (a stage with a trigger only). A stage that
    ends at its planned length with ``min_epochs`` at or past it never consults its trigger: training says so when
    it starts."""
    lr_mult: float = 1.0
    """Learning-rate multiplier of every group not listed in freeze / group_mults."""
    freeze: list[int] = field(default_factory=list)
    """Groups frozen in this stage (lr and weight decay 0, no grad, BatchNorm stats fixed)."""
    group_mults: dict[str, float] = field(default_factory=dict)
    """Per-group multipliers, keyed by group index as a string: {"0" = 0.1}. 0 = frozen."""
    reinit_head: bool = False
    """Re-initialise the head (last group) at the start of this stage."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The stage's loss terms."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, f"stage {self.name!r}: epochs={self.epochs} must be >= 0")
        _check(self.steps >= 0, f"stage {self.name!r}: steps={self.steps} must be >= 0")
        _check(self.lr_mult >= 0, f"stage {self.name!r}: lr_mult={self.lr_mult} must be >= 0")
        _check(self.min_epochs >= 0, f"stage {self.name!r}: min_epochs={self.min_epochs} must be >= 0")
        _check(not (self.epochs > 0 and self.steps > 0),
               f"stage {self.name!r}: epochs={self.epochs} and steps={self.steps}: give one length (steps counts only "
               f"when epochs is 0)")
        _check(self.min_epochs == 0 or self.trigger is not None,
               f"stage {self.name!r}: min_epochs={self.min_epochs} without a trigger: it delays the trigger's first "
               f"check, and this stage has none")
        for g in self.freeze:
            _check(g >= 0, f"stage {self.name!r}: freeze names group {g}; indices are >= 0")
        for k, v in self.group_mults.items():
            _check(k.isascii() and k.isdigit() and str(int(k)) == k,  # one spelling per group: '03', '³' are not
                   f"stage {self.name!r}: group_mults key {k!r} is not a group index (0, 1, ...)")
            _check(v >= 0, f"stage {self.name!r}: group_mults[{k}]={v} must be >= 0")
            _check(int(k) not in self.freeze, f"stage {self.name!r}: group {int(k)} is in freeze={self.freeze} and "
                   f"in group_mults ({{{k!r} = {v}}}): a frozen group has no multiplier; name it in one of them")
        if self.trigger is not None and self.trigger.stay_ce != 1:
            _check(self.epochs > 0 or self.steps > 0,
                   f"stage {self.name!r}: trigger.stay_ce={self.trigger.stay_ce} without a planned length (epochs "
                   f"and steps are 0): the stage runs to the end and is never past its planned length")
            loss = self.loss
            _check(loss.ce * self.trigger.stay_ce + loss.view_ce + loss.consistency > 0,
                   f"stage {self.name!r}: trigger.stay_ce={self.trigger.stay_ce} leaves no loss past its planned "
                   f"length (loss.view_ce and loss.consistency are 0)")

    def stay_loss(self) -> LossConfig:
        """The loss past the planned length of a stage that stays: ``loss.ce`` times ``trigger.stay_ce``."""
        if self.trigger is None or self.trigger.stay_ce == 1:
            return self.loss
        return dataclasses.replace(self.loss, ce=self.loss.ce * self.trigger.stay_ce)

    def mults(self, num_groups: int) -> list[float]:
        """The per-group lr multipliers of this stage (0 = frozen)."""
        out = [self.lr_mult] * num_groups
        for k, v in self.group_mults.items():
            out[int(k)] = v
        for g in self.freeze:
            out[g] = 0.0
        return out

    def max_group(self) -> int:
        idx = list(self.freeze) + [int(k) for k in self.group_mults]
        if self.trigger is not None:
            idx += [c.group for c in (self.trigger, *self.trigger.also) if c.kind == "cluster"]
        if self.loss.cluster_penalty > 0:
            idx.append(self.loss.cluster_group)
        return max(idx, default=-1)


@dataclass
class ScheduleConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(name="standard")])
    """Ordered stages; after the last one ends, the last stage's settings continue to the end of training."""
    freeze_bn_stats: bool = True
    """Keep BatchNorm running statistics of frozen groups fixed (modules in eval mode)."""
    check_every: int = 0
    """Run the detectors every N steps; 0 = at the end of each epoch."""
    eval_views: list[str] = field(default_factory=list)
    """Test-time views of the recipe: every evaluation of the model (validation and test in training, ``pst-dist
    eval``) predicts the class of highest mean softmax over the raw image and each of these views of it (e.g.
    ["blur:0.7"]); [] = the raw image alone. Deterministic views only. The bench's other defenses train and
    evaluate without them."""
    mean_repair: float = 0.0
    """A check and repair of the data before training (0: none). The check measures how far each class of the
    training images lies from the same class of the validation split where it does so unmistakably
    (``detect/mean_shift``: the class-wise mean shift per channel and pixel less its median over the classes,
    where it exceeds 4 standard errors, averaged; :func:`pst_dist.pst.detectors.mean_shift_values`) and that
    measure's sampling noise at the validation split's size (``detect/mean_noise``). When the shift exceeds
    ``mean_repair`` times the noise, the training set carries a class-wise additive shortcut (class-wise noise, LSP,
    a one-pixel shortcut), and the run trains on images with those significant shifts subtracted, class by class
    (``pst/mean_repair_changed``: the fraction of training pixels changed), from the first step to the last, probe
    and logged sample grid included. A run whose ``trigger.spectral_repair`` rewrote the images (a class-wise
    filter found) skips it: a filter's repair leaves a class-mean residue that is no additive shortcut (conv-blur:
    -1.1 points when both applied). A resume takes the check's values from meta.json's inputs. Needs the training
    images in memory and a validation split (data.val_size). The bench's other defenses train without it.
    Fashion-MNIST, 200 validation images per class, seeds 0-2: clean data 0.8 times the noise, AR 1.4, REM 2.3-3.4,
    OPS 8.5, EM 9-12, class-wise noise 12-13, LSP 15-17 (docs/results/pst_one_recipe.md, section 42)."""

    def __post_init__(self) -> None:
        _check(len(self.stages) > 0, "schedule.stages is empty: a schedule needs at least one stage")
        _check(self.check_every >= 0, f"schedule.check_every={self.check_every}: must be >= 0")
        _check(self.mean_repair >= 0, f"schedule.mean_repair={self.mean_repair}: must be >= 0 (0: no check)")
        check_eval_views("schedule.eval_views", self.eval_views)
        last = self.stages[-1]
        _check(last.trigger is None or last.trigger.stay_ce == 1,
               f"schedule.stages[{len(self.stages) - 1}] ({last.name!r}): trigger.stay_ce="
               f"{last.trigger and last.trigger.stay_ce} on the last stage, which never stays past its planned "
               f"length (it runs to the end as it is)")

    def spectral_checks(self) -> dict[int, float]:
        """{stage index: its ``trigger.spectral_check``} of the stages that check the data before training: all but
        the last (which never stays) whose trigger sets one."""
        return {i: st.trigger.spectral_check for i, st in enumerate(self.stages[:-1])
                if st.trigger is not None and st.trigger.spectral_check > 0}


@dataclass
class TrainConfig:
    epochs: int = 10
    """Total training length."""
    batch_size: int = 128
    """Per-process batch size."""
    optimizer: str = "sgd"
    """sgd (Nesterov momentum 0.9) | adamw."""
    lr: float = 0.1
    """Base learning rate (peak of the schedule)."""
    weight_decay: float = 5e-4
    """Weight decay (0 for frozen groups)."""
    lr_schedule: str = "cosine"
    """Base lr shape within each stage: cosine | constant | step (x0.1 at 50% and 75%)."""
    lr_span: str = "stage"
    """What the lr shape spans: ``stage`` (each stage anneals on its own, from train.lr, over its planned length) or
    ``run`` (one shape over the whole run, each stage taking its part of it, as a one-stage run does)."""
    warmup_steps: int = 0
    """Linear warm-up at the start of each stage (lr_span=run: of the run)."""
    bf16: bool = False
    """bf16 autocast for the forward pass."""
    seed: int = 0
    """Seed of model init, data order and augmentation."""
    eval_every: int = 1
    """Evaluate every N epochs (and always at the last)."""
    checkpoint_every: int = 1
    """Checkpoint every N epochs; 0 = only at the end."""
    device: str = "auto"
    """auto | cpu | cuda."""
    deterministic: bool | str = "auto"
    """torch.use_deterministic_algorithms: true | false | auto (true on the CPU, where resume is bit-identical;
    false on a GPU, where deterministic kernels are slower)."""
    channels_last: bool | str = "auto"
    """Channels-last memory format for model and batches: true | false | auto (on a GPU, for 4-D conv inputs)."""
    compile: bool = False
    """torch.compile the model (recompiles once per stage whose frozen prefix or BatchNorm modes differ; each
    compile is counted in metrics as perf/compiles)."""
    threads: int = 0
    """torch intra-op threads; 0 = leave torch's default."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs={self.epochs}: must be >= 1")
        _check_seed("train.seed", self.seed)
        _check(self.threads >= 0, f"train.threads={self.threads}: must be >= 0 (0: torch's default)")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size}: must be >= 1")
        _check(self.optimizer in ("sgd", "adamw"), f"train.optimizer={self.optimizer!r}: expected sgd|adamw")
        _check(self.lr > 0, f"train.lr={self.lr}: must be > 0")
        _check(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay}: must be >= 0")
        _check(self.lr_schedule in ("cosine", "constant", "step"),
               f"train.lr_schedule={self.lr_schedule!r}: expected cosine|constant|step")
        _check(self.lr_span in ("stage", "run"), f"train.lr_span={self.lr_span!r}: expected stage|run")
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device={self.device!r}: expected auto|cpu|cuda")
        _check(self.eval_every >= 1, f"train.eval_every={self.eval_every}: must be >= 1")
        _check(self.checkpoint_every >= 0, f"train.checkpoint_every={self.checkpoint_every}: must be >= 0 (0: only "
               f"at the end)")
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps}: must be >= 0")
        for key in ("deterministic", "channels_last"):
            v = getattr(self, key)
            _check(isinstance(v, bool) or v == "auto", f"train.{key}={v!r}: expected true|false|auto")


@dataclass
class LogConfig:
    run_dir: str = "runs/default"
    """Where config, metrics.jsonl, TensorBoard events and checkpoints go."""
    tensorboard: bool = True
    """Write TensorBoard scalars and the poisoned sample grid."""
    progress: bool = True
    """tqdm progress bars."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers beside TensorBoard, given the same scalars and the config (rank 0): wandb (offline unless
    WANDB_MODE says otherwise; files in <run_dir>/wandb) | mlflow (the store mlflow_uri names, else
    <run_dir>/mlruns). Each is an extra: pip install 'pst-dist[wandb]' or 'pst-dist[mlflow]'."""
    project: str = "pst-dist"
    """The W&B project and MLflow experiment the run is logged in (the run is named after log.run_dir)."""
    mlflow_uri: str = ""
    """MLflow tracking URI (a server, a database); empty = a file store in <run_dir>/mlruns."""

    def __post_init__(self) -> None:
        bad = [t for t in self.trackers if t not in TRACKER_TABLE]
        _check(not bad and len(set(self.trackers)) == len(self.trackers),
               f"log.trackers={self.trackers}: expected distinct names from {sorted(TRACKER_TABLE)}")
        _check(bool(self.project), "log.project is empty: name the W&B project / MLflow experiment")
        _check(bool(self.run_dir.strip()), f"log.run_dir={self.run_dir!r}: empty; name the run directory")
        try:
            self.run_dir.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"log.run_dir={self.run_dir!r}: holds bytes that are not UTF-8, which config.toml "
                              f"cannot record; rename it") from None


@dataclass
class DeepSpeedConfig:
    enabled: bool = False
    """Train through a DeepSpeed engine (any launcher: python, torchrun, deepspeed, Ray Train workers)."""
    zero_stage: int = 0
    """ZeRO stage 0-3. PST freezing is by per-group lr / weight decay 0, which holds at every stage."""
    bf16: bool = False
    """bf16 weights and compute (DeepSpeed's bf16 mode; fp32 master weights in the optimizer)."""
    fp16: bool = False
    """fp16 with dynamic loss scaling."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (train.batch_size is the micro-batch per process)."""
    grad_clip: float = 0.0
    """Global gradient-norm clipping; 0 = off."""
    offload_optimizer: bool = False
    """ZeRO 1-3: optimizer state in CPU memory."""
    offload_param: bool = False
    """ZeRO 3: parameters in CPU memory."""
    bucket_size: int = 0
    """ZeRO 1-3 reduce / all-gather bucket, in elements; 0 = auto: DeepSpeed's 5e8, or the model's parameter count
    when smaller (every step fills the bucket: 5e8 costs about a second per step on a CPU for a tiny model)."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        _check(not (self.bf16 and self.fp16), "deepspeed.bf16 and deepspeed.fp16 are both true: pick one")
        _check(self.grad_accum >= 1, f"deepspeed.grad_accum={self.grad_accum}: must be >= 1")
        _check(self.grad_clip >= 0, f"deepspeed.grad_clip={self.grad_clip}: must be >= 0")
        _check(self.bucket_size >= 0, f"deepspeed.bucket_size={self.bucket_size}: must be >= 0")
        _check(not self.offload_optimizer or self.zero_stage >= 1,
               "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        _check(not self.offload_param or self.zero_stage == 3, "deepspeed.offload_param needs deepspeed.zero_stage = 3")


@dataclass
class DefenseConfig:
    kind: str = "none"
    """none | jpeg (ISS: the training images through JPEG at jpeg_quality) | grayscale (ISS: training images to
    grayscale; a no-op on 1-channel data) | adv (PGD adversarial training: every batch replaced by its PGD
    examples) | ueraser (UEraser as APBench implements it: every batch, after data.augment, through kornia's plasma
    brightness, plasma contrast, channel shuffle and TrivialAugment, ueraser_repeats times, trained on the maximum
    loss over those views). jpeg and grayscale touch the training images only, after the poison."""
    jpeg_quality: int = 10
    """JPEG quality for kind=jpeg (ISS uses 10)."""
    ueraser_repeats: int = 5
    """kind=ueraser: views of each batch; with more than one, each image's cross-entropy is maximised over its
    views and averaged over the batch (UEraser-Max; APBench uses 5), which needs stages whose loss is cross-entropy
    only; 1 = one view per batch, trained on the stage's loss."""
    ueraser_repeat_epochs: int = 0
    """kind=ueraser: epochs from the start trained on the maximum over ueraser_repeats views, one view per batch
    after (APBench's repeat_epoch: 50 of 200 epochs for UEraser); 0 = every epoch (UEraser-Max)."""
    adv_eps: float = 8 / 255
    """kind=adv: L-inf radius of the PGD examples, [0, 1] pixel units."""
    adv_step: float = 2 / 255
    """kind=adv: PGD step size."""
    adv_steps: int = 10
    """kind=adv: PGD steps (from a uniform random start)."""

    def __post_init__(self) -> None:
        _check(self.kind in ("none", "jpeg", "grayscale", "adv", "ueraser"),
               f"defense.kind={self.kind!r}: expected none|jpeg|grayscale|adv|ueraser")
        _check(self.ueraser_repeats >= 1 and self.ueraser_repeat_epochs >= 0,
               f"defense: ueraser_repeats={self.ueraser_repeats} must be >= 1, ueraser_repeat_epochs="
               f"{self.ueraser_repeat_epochs} >= 0")
        _check(1 <= self.jpeg_quality <= 100, f"defense.jpeg_quality={self.jpeg_quality}: must lie in 1..100")
        _check(0 < self.adv_eps <= 1 and 0 < self.adv_step <= 1 and self.adv_steps >= 1,
               f"defense: adv_eps={self.adv_eps}, adv_step={self.adv_step} must lie in (0, 1], adv_steps="
               f"{self.adv_steps} >= 1")


SCHEDULERS = ("asha", "pbt", "fifo")


@dataclass
class TuneConfig:
    """The Ray Tune search over PST schedules (``pst-dist tune``). The base config's schedule is the template:
    its first stage is the warm-up (loss, trigger kind and view), its second the frozen stage (loss, head re-init),
    its last the release stage (loss). A trial's schedule is: warm-up, all of ``unfreeze_groups`` frozen, then one
    release stage per group in the trial's unfreeze order, each releasing one more group at its own lr multiplier.
    Orders and lengths that do not fit in train.epochs are never sampled. The objective is clean validation
    accuracy (eval/val_acc); test accuracy is only logged. With ``attacks`` a trial trains one run per attack and the
    objective is the worst of their validation accuracies (one recipe for data protected by an unknown attack)."""

    num_samples: int = 8
    """Trials of the random search (search='grid' runs every combination once and ignores it)."""
    search: str = "random"
    """random (sample num_samples schedules) | grid (every combination: the exhaustive search)."""
    scheduler: str = "asha"
    """asha (stop weak trials early) | pbt (population based training, checkpoints every pbt_interval epochs;
    mutates thresholds and lr multipliers) | fifo (run every trial to the end)."""
    workers: int = 2
    """Ray Train workers (processes) per trial; each runs the DeepSpeed engine when [deepspeed] is enabled."""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves."""
    use_gpu: str = "auto"
    """yes | no | auto (yes when the cluster, or this machine for a local Ray, has GPUs when the search starts).
    Declare yes on an autoscaling cluster whose GPU workers are not up yet: the request makes the autoscaler
    launch them (the cluster recipes' searches do)."""
    gpus_per_worker: float = 1.0
    """GPUs each worker asks for when use_gpu is yes (a fraction packs trials of one worker each on a GPU; with
    workers > 1 refused: NCCL takes one rank per device)."""
    max_concurrent: int = 0
    """Trials at once; 0 = on a cluster no cap (every trial's workers are requested, an autoscaler adds nodes for
    them; set a cap to bound the cost), on a local Ray as many as this machine holds for one trial's request."""
    warm_epochs: list[float] = field(default_factory=lambda: [1.0])
    """Choices for the warm-up stage's maximum length (its trigger may end it earlier; with the template's
    ``trigger.otherwise = "stay"``, carried into every trial, an unfired warm-up goes on to the run's end, and the
    trial's later stages do not run)."""
    thresholds: list[float] = field(default_factory=lambda: [0.2])
    """Choices for the warm-up trigger's threshold (ignored when the template's first stage has no trigger)."""
    freeze_epochs: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Choices for the length of the stage with every group of ``unfreeze_groups`` frozen."""
    release_epochs: list[float] = field(default_factory=lambda: [1.0])
    """Choices for the length of each release stage but the last (the last runs to the end)."""
    unfreeze_groups: list[int] = field(default_factory=lambda: [0, 1])
    """Groups frozen after the warm-up; the unfreeze order is a permutation of them. Never the head."""
    unfreeze_orders: list[str] = field(default_factory=list)
    """Allowed orders as "1-0" strings; empty = every permutation of unfreeze_groups."""
    release_mults: list[float] = field(default_factory=lambda: [0.1, 1.0])
    """Choices for each release stage's lr multiplier of the groups released so far."""
    grace_period: int = 1
    """ASHA: epochs every trial gets before it can be stopped."""
    reduction_factor: int = 3
    """ASHA: keep the top 1/reduction_factor at each rung."""
    pbt_interval: int = 1
    """PBT: epochs between exploit/explore steps (one checkpoint each)."""
    max_failures: int = 2
    """Retries of a trial whose worker died (Ray Train, from the last checkpoint) and of a failed trial (Tune)."""
    out: str = "runs/tune"
    """Search storage: Ray's experiment state, trials' run directories (TensorBoard) and checkpoints, results and
    best schedule. On a cluster a directory every node mounts at the same path (the search resumes from there)."""
    name: str = "pst_search"
    """Experiment name (a subdirectory of out)."""
    seed: int = 0
    """Seed of the search's sampler."""
    attacks: list[str] = field(default_factory=list)
    """Attacks every trial trains on, one run each, in lockstep epoch by epoch (``none``: the clean data); the
    objective is then each epoch's worst validation accuracy over them. Empty = the config's own [poison]. Leave an
    attack out to check the chosen recipe on it afterwards (``pst-dist bench`` with every attack). Each worker holds
    every run's data in memory (one per attack, and seed with tune.seeds) and builds each run's model and engine
    again every epoch (a resume; with train.compile, a compile each time); not with scheduler pbt."""
    seeds: list[int] = field(default_factory=list)
    """Seeds every attack's run is trained with, one run per (attack, seed), as a bench's seeds: seed s trains on
    the attack's seed-s poison (``poison.seed = train.seed = s``). The objective is then each epoch's worst, over
    the attacks, of the mean validation accuracy over the seeds: a setting must win on average, not on one draw.
    Empty = one run per attack with the config's own seeds. Needs tune.attacks (["em"] for a single attack)."""
    ties: str = "order"
    """How the best trial is picked among trials whose objective is equal: order (the first by trial id) | clean (the
    higher clean validation accuracy, attack ``none``, which tune.attacks must then include: the cost on clean data
    decides; then the order). Validation only, as the objective."""
    poisons: str = ""
    """Directory of the attacks' poison stores, ``<attack>_seed<poison.seed>`` (``<attack>_seed<s>`` for each of
    tune.seeds) as ``pst-dist bench`` caches them
    under ``<bench.out>/poisons`` (missing ones are made there first, by the search's driver, with
    ``[bench.attack_overrides]``; one made with other settings is refused; do not make the same store from a bench
    at the same time). On a cluster a directory every node mounts. Empty = ``<out>/<name>_poisons``."""
    views: list[str] = field(default_factory=list)
    """Choices for the PST view (every stage's loss view and the warm-up trigger's view, e.g.
    "randblur:2+quantize:3"); empty = the template's."""
    consistency: list[float] = field(default_factory=list)
    """Choices for the release stages' consistency weight; empty = the template's."""
    release_ce: list[float] = field(default_factory=list)
    """Choices for the release stages' cross-entropy weight on the raw images (loss.ce); empty = the template's."""
    release_views: list[str] = field(default_factory=list)
    """Choices for the release stages' view (after tune.views set every stage's); empty = as the other stages."""
    last_ce: list[float] = field(default_factory=list)
    """Choices for the last stage's raw cross-entropy weight (the stage that runs to train.epochs, after
    tune.release_ce set every release stage's): raw cross-entropy early or late in the release; empty = as the
    other release stages."""
    release_smoothing: list[float] = field(default_factory=list)
    """Choices for the release stages' label smoothing (loss.label_smoothing, of both cross-entropy terms), each in
    [0, 1); empty = the template's."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, f"tune.num_samples={self.num_samples}: must be >= 1")
        _check_seed("tune.seed", self.seed)
        _check(self.search in ("random", "grid"), f"tune.search={self.search!r}: expected random|grid")
        _check(self.scheduler in SCHEDULERS, f"tune.scheduler={self.scheduler!r}: expected {'|'.join(SCHEDULERS)}")
        _check(self.workers >= 1, f"tune.workers={self.workers}: must be >= 1")
        _check(self.cpus_per_worker > 0, f"tune.cpus_per_worker={self.cpus_per_worker}: must be > 0")
        _check(self.use_gpu in ("auto", "yes", "no"), f"tune.use_gpu={self.use_gpu!r}: expected auto|yes|no")
        _check(self.max_concurrent >= 0, f"tune.max_concurrent={self.max_concurrent}: must be >= 0")
        _check(self.gpus_per_worker > 0, f"tune.gpus_per_worker={self.gpus_per_worker}: must be > 0 (use_gpu=no for "
                                         f"CPU workers)")
        _check("://" not in self.out, f"tune.out={self.out!r}: a bucket URI is not supported: trial run directories "
               f"(metrics, TensorBoard, checkpoints) are files that Ray Train workers on every node write and read "
               f"back; use a directory every node mounts (NFS, EFS, Filestore, a PVC)")
        for key in ("warm_epochs", "thresholds", "freeze_epochs", "release_epochs", "release_mults"):
            vals = getattr(self, key)
            _check(len(vals) > 0, f"tune.{key} is empty: give at least one choice")
            _check(all(v >= 0 for v in vals), f"tune.{key}={vals}: choices must be >= 0")
        _check(len(self.unfreeze_groups) < 2 or all(v > 0 for v in self.release_epochs),
               f"tune.release_epochs={self.release_epochs}: choices must be > 0 (a release stage of no length would "
               f"run to the end of training: the groups after it would never be released)")
        _check(len(self.unfreeze_groups) > 0, "tune.unfreeze_groups is empty: name the groups to freeze and release")
        _check(len(set(self.unfreeze_groups)) == len(self.unfreeze_groups),
               f"tune.unfreeze_groups={self.unfreeze_groups}: a group appears twice")
        _check(all(g >= 0 for g in self.unfreeze_groups), f"tune.unfreeze_groups={self.unfreeze_groups}: must be >= 0")
        for text in self.unfreeze_orders:  # (whether the groups are the model's is checked when the search starts)
            order = parse_order(text, "tune.unfreeze_orders:")
            _check(sorted(order) == sorted(self.unfreeze_groups),
                   f"tune.unfreeze_orders: {text!r} is not a permutation of tune.unfreeze_groups="
                   f"{self.unfreeze_groups}")
        _check(self.grace_period >= 1, f"tune.grace_period={self.grace_period}: must be >= 1")
        _check(self.reduction_factor >= 2, f"tune.reduction_factor={self.reduction_factor}: must be >= 2")
        _check(self.pbt_interval >= 1, f"tune.pbt_interval={self.pbt_interval}: must be >= 1")
        _check(self.max_failures >= 0, f"tune.max_failures={self.max_failures}: must be >= 0")
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
               f"tune.name={self.name!r}: a folder name (not empty, '.' or '..', without '/')")
        bad = [a for a in self.attacks if a not in POISONS or a == "file"]
        _check(not bad, f"tune.attacks: unknown attack(s) {bad}; expected from {sorted(POISONS - {'file'})}")
        _check(len(set(self.attacks)) == len(self.attacks), f"tune.attacks={self.attacks}: an attack appears twice")
        _check(not (self.attacks and self.scheduler == "pbt"),
               f"tune.scheduler='pbt' with tune.attacks={self.attacks}: PBT's exploit copies one run's checkpoint, a "
               f"multi-attack trial holds one per attack; use asha or fifo")
        _check(not self.seeds or bool(self.attacks),
               f"tune.seeds={self.seeds} without tune.attacks: seeds are trained per attack; name the poison's "
               f"attack in tune.attacks (e.g. [\"em\"])")
        _check(all(s >= 0 for s in self.seeds) and len(set(self.seeds)) == len(self.seeds),
               f"tune.seeds={self.seeds}: distinct seeds >= 0")
        _check(self.ties in ("order", "clean"), f"tune.ties={self.ties!r}: expected order|clean")
        _check(self.ties != "clean" or "none" in self.attacks,
               f"tune.ties='clean' with tune.attacks={self.attacks}: the tie-break reads the clean run's validation "
               f"accuracy; add \"none\" to tune.attacks")
        _check(not self.poisons or bool(self.attacks),
               f"tune.poisons={self.poisons!r} without tune.attacks: the stores are read only by a search over attacks")
        for key in ("views", "release_views"):
            for v in getattr(self, key):
                _check_view(f"tune.{key}", v)
        for key in ("consistency", "release_ce", "last_ce"):  # loss weights
            _check(all(c >= 0 for c in getattr(self, key)), f"tune.{key}={getattr(self, key)}: choices must be >= 0")
        _check(all(0 <= c < 1 for c in self.release_smoothing),
               f"tune.release_smoothing={self.release_smoothing}: choices must lie in [0, 1)")


BENCH_DEFENSES = tuple(DEFENSES)  # pst_dist.registry.DEFENSES


@dataclass
class BenchConfig:
    """The attack x defense matrix (``pst-dist bench``); every other section is the recipe each cell starts from
    (its [schedule] is the PST schedule; the other defenses train one standard stage)."""

    attacks: list[str] = field(default_factory=lambda: ["classwise_noise", "lsp", "ar", "ops", "conv_blur", "em",
                                                        "rem", "tap"])
    """poison.kind names; "none" adds the clean-data reference row."""
    defenses: list[str] = field(default_factory=lambda: ["standard", "early_stop", "jpeg10", "adv", "pst"])
    """standard | early_stop (read off the standard run: test accuracy at its best validation epoch) | jpeg10 |
    grayscale | ueraser (UEraser-Max as APBench implements it, defense.kind = "ueraser") | ueraser_lite (the light
    hand-written one, data.augment = "ueraser") | adv | pst."""
    seeds: int = 2
    """Seeds 0..seeds-1; seed k sets both poison.seed and train.seed."""
    jobs: int = 1
    """Cells (and poisons) run at once, each in its own process with cpu_count / jobs torch threads (runner =
    "pool"; 0 counts as 1); with runner = "ray", the most Ray tasks in flight (0 = as many as the cluster's
    resources hold)."""
    runner: str = "pool"
    """pool (a process pool on this machine) | ray (each poison and cell a Ray task: a local Ray, or the cluster
    RAY_ADDRESS names; on a cluster ``out`` must be a directory every node sees)."""
    gpus_per_cell: float = 1.0
    """runner = "ray": GPUs each task asks for where the cluster has GPUs (a fraction packs cells on a GPU)."""
    cpus_per_cell: float = 1.0
    """runner = "ray": CPUs each task asks for (its torch threads)."""
    out: str = "runs/bench"
    """Output directory: poisons/, cells/ (a run directory per cell), results.csv, results.md, heatmap.png."""
    attack_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per attack, config overrides for its poison and cells, e.g. em = ["poison.max_rounds=10"]."""
    defense_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Per training run (standard, jpeg10, grayscale, ueraser, ueraser_lite, adv, pst), config overrides, e.g.
    adv = ["defense.adv_steps=10"]."""

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in POISONS or a == "file"]
        _check(not bad and bool(self.attacks), f"bench.attacks={self.attacks}: {bad or 'empty'}; expected names from "
               f"{sorted(POISONS - {'file'})}")
        bad = [d for d in self.defenses if d not in BENCH_DEFENSES]
        _check(not bad and bool(self.defenses), f"bench.defenses={self.defenses}: {bad or 'empty'}; expected names "
               f"from {list(BENCH_DEFENSES)}")
        for key in ("attacks", "defenses"):  # a cell twice: two processes would write one run directory at once
            twice = sorted({x for x in getattr(self, key) if getattr(self, key).count(x) > 1})
            _check(not twice, f"bench.{key}={getattr(self, key)}: {twice} named more than once")
        _check(self.seeds >= 1 and self.jobs >= 0, f"bench.seeds={self.seeds}, bench.jobs={self.jobs}: seeds must be "
               f">= 1, jobs >= 0")
        _check(self.runner in ("pool", "ray"), f"bench.runner={self.runner!r}: expected pool|ray")
        _check(self.gpus_per_cell >= 0 and self.cpus_per_cell > 0,
               f"bench.gpus_per_cell={self.gpus_per_cell}, bench.cpus_per_cell={self.cpus_per_cell}: gpus must be "
               f">= 0, cpus > 0")
        runs = {e.data["run"] for e in DEFENSES.values()}
        bad = [k for k in self.defense_overrides if k not in runs]
        _check(not bad, f"bench.defense_overrides: unknown run(s) {bad}; expected from {sorted(runs)}")
        bad = [k for k in self.attack_overrides if k not in POISONS or k == "file"]
        _check(not bad, f"bench.attack_overrides: unknown attack(s) {bad}; expected from {sorted(POISONS - {'file'})}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    poison: PoisonConfig = field(default_factory=PoisonConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def __post_init__(self) -> None:
        _check(not (self.train.channels_last is True and self.deepspeed.enabled),
               "train.channels_last=true with deepspeed.enabled: DeepSpeed flattens parameters and needs them "
               "contiguous; leave train.channels_last=auto (off under DeepSpeed) or false")
        checks = self.schedule.spectral_checks()
        keys = [f"schedule.stages[{min(checks)}].trigger.spectral_check={checks[min(checks)]}"] if checks else []
        keys += [f"schedule.mean_repair={self.schedule.mean_repair}"] if self.schedule.mean_repair else []
        for key in keys:  # what a data check needs, refused before any data is built (poisons crafted)
            _check(self.data.val_size > 0, f"{key} with data.val_size=0: the check compares the training images "
                   f"with the validation split's")
            _check(self.data.stream is not True, f"{key} with data.stream=true: the check reads every training "
                   f"image; data.stream=false (or auto) reads them into memory")
            _check(self.data.source != "beton", f"{key} with data.source='beton': the check reads every training "
                   f"image; train from the data set's own source")
        _check(not self.poison.eot or self.data.augment in ("none", "crop", "crop_flip"),
               f"poison.eot={self.poison.eot} differentiates through the training augmentation: "
               f"data.augment={self.data.augment!r} is not supported (crop, crop_flip or none; or poison.eot=0)")
        d = self.defense
        mixed = [s.name or str(i) for i, s in enumerate(self.schedule.stages) if s.loss.mix != "none"]
        _check(not (mixed and d.kind == "ueraser"), f"loss.mix in stage(s) {mixed} with defense.kind='ueraser': "
               f"UEraser trains on its own views of the batch; mix in one or the other")
        if d.kind == "ueraser" and d.ueraser_repeats > 1:
            bad = [s.name or str(i) for i, s in enumerate(self.schedule.stages)
                   if s.loss.ce <= 0 or s.loss.view_ce or s.loss.consistency or s.loss.cluster_penalty]
            _check(not bad, f"defense.kind='ueraser' with defense.ueraser_repeats={d.ueraser_repeats} trains on the "
                   f"maximum cross-entropy over the views: every stage's loss must be ce only (ce > 0, view_ce, "
                   f"consistency and cluster_penalty 0), not that of stage(s) {bad}; or set "
                   f"defense.ueraser_repeats=1 (one view per batch, the stages' own losses)")


# ----------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _long_number(value: int | float) -> str:
    """A number as an error message shows it: its first 37 digits and '...' past 40."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting ints to floats); raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        for tp_ in inner:  # e.g. bool | str: true / false or "auto"
            try:
                return _coerce(value, tp_, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(t) for t in inner)}, got "
                          f"{type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        try:
            finite = math.isfinite(value)  # an int past a float's range overflows here
        except OverflowError:
            finite = False
        if not finite:
            raise ConfigError(f"{key}={_long_number(value)}: expected a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        if not -2 ** 63 <= value < 2 ** 63:  # TOML's integers are 64-bit: config.toml could not record it
            raise ConfigError(f"{key}={_long_number(value)}: out of range (a config holds 64-bit integers)")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            shown = (str(value).lower() if isinstance(value, bool) else value.isoformat()
                     if isinstance(value, (datetime.date, datetime.time)) else value)
            hint = (f" (TOML reads it as a number, date or true/false: quote it, e.g. --{key}='\"{shown}\"' on the "
                    f"command line)" if isinstance(value, (int, float, datetime.date, datetime.time)) else "")
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}{hint}")
        try:
            value.encode("utf-8")  # a lone surrogate (a non-UTF-8 file name) could never be recorded in config.toml
        except UnicodeEncodeError:
            raise ConfigError(f"{key}={value!r}: holds bytes that are not UTF-8 (a lone surrogate); a run records "
                              f"its config as UTF-8 TOML: rename the path or value") from None
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


RETIRED = {"train.num_workers": (0, "it was never read: the training DataLoader's workers are data.loader_workers")}
"""Keys that are gone, with the value they always had in effect: a config that sets one to it (the configs that
``pst-dist tune`` wrote) still loads, without the key; any other value is refused, with the reason, rather than
silently meaning nothing. A run's recorded config.toml (``load_config(recorded=True)``) loads at any value."""


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if not _retired(f"{prefix}.{k}" if prefix else k, v)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key {where!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}: {e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def _retired(key: str, value: Any) -> bool:
    """Whether ``key`` is retired (RETIRED) and set to the value it always had; ConfigError for any other value."""
    if key not in RETIRED:
        return False
    was, why = RETIRED[key]
    if value != was or type(value) is not type(was):
        raise ConfigError(f"{key}={value!r}: this key is retired ({why}); remove it")
    return True


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _parse_value(text: str, item: str) -> Any:
    """Parse an override's value as a TOML value; bare words are strings. A value TOML reads only part of (a ``#``
    starting a comment, a newline: ``5#0`` read as 5) is a ConfigError naming ``item``, the override."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    try:
        # a comment would swallow the bracket; compared as text, so that nan (never equal to itself) is whole too
        whole = repr(tomllib.loads(f"v = [{text}]")["v"]) == repr([value])
    except tomllib.TOMLDecodeError:
        whole = False
    if not whole:
        raise ConfigError(f"override {item!r}: TOML reads only part of the value {text!r} (a '#' starts a comment); "
                          f"quote it as a string, or remove what follows")
    return value


def _index(item: str, node: list, p: str) -> int:
    if not (p.isascii() and p.isdigit()):
        raise ConfigError(f"override {item!r}: {p!r} indexes a list: expected 0, 1, ...")
    if int(p) >= len(node):
        raise ConfigError(f"override {item!r}: index {int(p)} out of range (have {len(node)})")
    return int(p)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--section.key=value`` (or ``section.key=value``) overrides to a raw config dict."""
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        dotted, text = body.split("=", 1)
        parts = dotted.split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        node = raw
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_index(item, node, p)]
            elif p.isdigit() and p not in node:  # an index into a list the file does not give (a default's)
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is not a list in the config file, so "
                                  f"its item {p} cannot be set alone; give the whole list "
                                  f"(--{'.'.join(parts[:i])}=[...])")
            else:
                node = node.setdefault(p, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {item!r}: {p!r} is not a table")
        value = _parse_value(text, item)
        if isinstance(node, list):
            node[_index(item, node, parts[-1])] = value
        else:
            node[parts[-1]] = value
    return raw


def _drop_inert_stage_settings(st: dict) -> None:
    """A recorded stage's settings that did nothing in its run and that a config now refuses (StageConfig): steps
    beside epochs (epochs counted), min_epochs without a trigger, a frozen group's group_mults entry (freeze won).
    Dropped, so a run recorded before the refusals still resumes, evaluates and exports as it trained."""
    if _positive(st.get("epochs")) and _positive(st.get("steps")):
        st.pop("steps")
    if st.get("trigger") is None:
        st.pop("min_epochs", None)
    frozen, mults = st.get("freeze"), st.get("group_mults")
    if isinstance(frozen, list) and isinstance(mults, dict):
        st["group_mults"] = {k: v for k, v in mults.items() if not (str(k).isdigit() and int(k) in frozen)}


def _as_trained_negatives(train: Any) -> None:
    """A recorded train.checkpoint_every or warmup_steps below 0, accepted before they were refused, as its run
    trained with it: every |n| epochs (``epoch % n``), no warm-up."""
    if not isinstance(train, dict):
        return
    for key, trained in (("checkpoint_every", abs), ("warmup_steps", lambda v: 0)):
        v = train.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            train[key] = trained(v)


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, recorded: bool = False) -> Config:
    """Load a Config from a TOML file (or defaults) plus overrides. ``recorded``: the file is a run's own record
    (its config.toml), whose :data:`RETIRED` keys are dropped at any value (they never did anything), as are stage
    settings that did nothing in it (:func:`_drop_inert_stage_settings`)."""
    raw: dict = {}
    if path is not None:
        path = _expand_user(Path(path), "--config")  # a '~' quoted for a cluster's shell reaches us literally
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e.strerror or e})") from None
    if recorded:
        for key in RETIRED:
            section, name = key.split(".")
            if isinstance(raw.get(section), dict):
                raw[section].pop(name, None)
        stages = raw.get("schedule", {}).get("stages") if isinstance(raw.get("schedule"), dict) else None
        for st in stages if isinstance(stages, list) else []:
            if isinstance(st, dict):
                _drop_inert_stage_settings(st)
        _as_trained_negatives(raw.get("train"))
    raw = apply_overrides(raw, overrides or [])
    return from_dict(Config, raw)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters (U+0000-U+001F, U+007F) escaped, every
    other character as itself (UTF-8). (JSON's escapes are not TOML's: it writes characters beyond U+FFFF as
    surrogate pairs and leaves U+007F raw, both invalid TOML.)"""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            raise ConfigError(f"{s!r}: holds a lone surrogate (bytes that are not UTF-8), which TOML cannot hold")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: Config) -> str:
    """Serialise a Config to TOML that ``load_config`` reads back to an equal Config."""
    out: list[str] = []
    for section, body in to_dict(cfg).items():
        arrays = {k: v for k, v in body.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in body.items() if k not in arrays and v is not None]
        out.append("")
        for k, items in arrays.items():
            for item in items:
                out.append(f"[[{section}.{k}]]")
                out += [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items() if vv is not None]
                out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# comparing configs (resume, bench cells)


def flat_config(cfg: Config, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config as dotted keys (list-of-table items by index: ``schedule.stages.2.loss.view``), without the
    sections / keys whose dotted name starts with one of ``drop``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and not (prefix.endswith("group_mults") or prefix.endswith("_overrides")):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        elif not any(prefix == d or prefix.startswith(d.rstrip(".") + ".") for d in drop):
            flat[prefix] = v

    walk("", to_dict(cfg))
    return flat


def config_changes(was: dict, now: dict) -> dict[str, tuple]:
    """{key: (was, now)} for every key whose value differs (a key missing on one side counts as None)."""
    return {k: (was.get(k), now.get(k)) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)}


def auto_meaning(flat: dict[str, Any], device_type: str) -> dict[str, Any]:
    """``flat`` (:func:`flat_config`) with the ``auto`` settings that can change a result replaced by what they mean
    on ``device_type`` (cpu | cuda): deterministic algorithms on the CPU only, channels-last on a GPU without
    DeepSpeed. A resume or a cached bench cell compares these, so a run recorded before such a default existed
    (``deterministic = true``) still matches ``auto`` on the CPU, and a run moved to another device type does not."""
    out = dict(flat)
    if out.get("train.deterministic") == "auto":
        out["train.deterministic"] = device_type == "cpu"
    if out.get("train.channels_last") == "auto":
        out["train.channels_last"] = device_type == "cuda" and not out.get("deepspeed.enabled", False)
    return out


def absolute_paths(cfg: Config, also: tuple[tuple[str, str], ...] = ()) -> None:
    """Make the data and poison paths (and the ``(section, key)`` paths ``also`` names) absolute, in place: work run
    in other processes and working directories (Ray tasks and trials, on other nodes of a cluster) must not depend
    on this one's. Only this machine's ``~`` is expanded (a command sent to a cluster names paths as it sees them)."""
    for section, key in (("data", "root"), ("poison", "path"), *also):
        part = getattr(cfg, section)
        if getattr(part, key):
            setattr(part, key, str(_expand_user(Path(getattr(part, key)), f"{section}.{key}").resolve()))


def _expand_user(path: Path, key: str) -> Path:
    try:
        return path.expanduser()
    except RuntimeError:  # '~nosuchuser/...'
        raise ConfigError(f"{key}={str(path)!r}: no such user's home directory") from None


def device_type(cfg: Config) -> str:
    """What ``train.device`` means on this machine: cpu | cuda."""
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch  # start-up time: the config module stays torch-free until a device must be known

    return "cuda" if torch.cuda.is_available() else "cpu"


RESUME_MAY_CHANGE = ("train.epochs", "train.threads", "train.checkpoint_every",
                     "data.loader_workers", "data.prefetch", "data.on_device", "data.stream", "data.verify", "log",
                     "tune", "bench")
"""What ``--resume`` accepts as changed against the run's recorded config.toml: more ``train.epochs`` (never fewer
than already trained; the cosine base lr then stretches over the new length, and meta.json records the change),
thread / worker counts, checkpoint frequency, whether batches are held on the device or streamed from an image
folder (the same batches either way), hash verification, and the [log], [tune] and [bench] sections, which
do not change what is trained. ``data.root`` (.beton data) and ``poison.path`` may name another path, where the
run recorded what its files hold (:func:`pst_dist.rundir.relocations`: the files there are checked against the
record). Everything else is refused, naming each differing key."""


# ----------------------------------------------------------------------------------------------------------------
# the documented keys (``pst-dist keys``): types and docstrings read from the dataclasses' source


@dataclass
class KeyDoc:
    key: str
    """Dotted, list items as ``[]``: ``schedule.stages[].trigger.kind``."""
    type: str
    """The annotation as written."""
    default: Any
    doc: str


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (the string under each field), from its source and its
    dataclass bases' (a field written again in ``cls`` takes its docstring there)."""
    docs: dict[str, str] = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(c))).body[0].body
        docs |= {node.target.id: inspect.cleandoc(doc.value.value) for node, doc in zip(body, body[1:], strict=False)
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                 and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                 and isinstance(doc.value.value, str)}
    return docs


def class_doc(cls: type) -> str:
    """The docstring written in ``cls`` ("" when none: ``cls.__doc__`` is then dataclass's signature)."""
    return ast.get_docstring(ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]) or ""


def _table(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (itself, a list of it, or it or None); None for a plain value."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not dict else []
    for t in (tp, *inner):
        if dataclasses.is_dataclass(t):
            return t
    return None


def config_keys(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every key of the config tree under ``cls`` with its type, default and docstring; a field holding a table (or
    a list of tables) is listed, then the table's keys."""
    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if cls is not Config:  # Config's own fields are the sections
            out.append(KeyDoc(key, str(f.type), default, docs.get(f.name, "")))
        table = _table(hints[f.name])
        if table is not None:
            out += config_keys(table, f"{key}[]." if typing.get_origin(hints[f.name]) is list else f"{key}.")
    return out


def shown_default(v: Any) -> str:
    """A default as TOML; a table's as its keys that differ from their own defaults."""
    if dataclasses.is_dataclass(v):
        base = type(v)()
        return "{" + ", ".join(f"{f.name} = {_toml_value(to_dict(getattr(v, f.name)))}" for f in dataclasses.fields(v)
                               if getattr(v, f.name) != getattr(base, f.name)) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(shown_default(x) for x in v) + "]"
    return "none" if v is None else _toml_value(v)
