"""One table per extension point: a name, where its implementation lives, and what it is.

The tables hold import paths (``"pst_dist.poison.shortcuts:lsp"``), not the functions, so that reading and checking a
config (``pst_dist.config``) and listing what exists (docs, ``--help``) need neither torch nor the implementations.
An implementation is imported the first time it is used, by :meth:`Registry.load`.

Adding an attack is one new file with its function and one line in :data:`ATTACKS`; likewise a trigger, a view or a
defense run of the bench. ``tests/test_registry.py`` checks that every entry imports and has the declared form.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    target: str
    """``"module:attribute"`` of the implementation ("" for entries that are pure data, e.g. a bench run)."""
    doc: str
    """One line for docs and error messages."""
    kind: str = ""
    """The form of the implementation, where a table has several (attacks: ``cheap`` or ``model``)."""
    data: dict[str, Any] = field(default_factory=dict)
    """Extra facts a table needs (attacks: ``budget`` linf | l2 | l0 | none)."""


class Registry(dict):
    """name -> :class:`Entry`, with lazy loading and errors that name the known entries."""

    def __init__(self, what: str, entries: dict[str, Entry]):
        super().__init__(entries)
        self.what = what

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, e in self.items() if kind is None or e.kind == kind]

    def entry(self, name: str) -> Entry:
        if name not in self:
            raise KeyError(f"unknown {self.what} {name!r}: expected one of {sorted(self)}")
        return self[name]

    def load(self, name: str) -> Any:
        """The implementation of ``name`` (imported now)."""
        module, _, attr = self.entry(name).target.partition(":")
        return getattr(importlib.import_module(module), attr)


ATTACKS = Registry("attack", {
    # cheap: fn(images uint8 NCHW, labels, PoisonConfig, num_classes) -> poisoned uint8 images
    "classwise_noise": Entry("pst_dist.poison.cheap:classwise_noise",
                             "per-pixel uniform +-eps, one pattern per class", "cheap", {"budget": "linf"}),
    "patch_noise": Entry("pst_dist.poison.cheap:patch_noise", "LSP-like +-eps patches (patch_size), one pattern per "
                         "class", "cheap", {"budget": "linf"}),
    "samplewise_noise": Entry("pst_dist.poison.samplewise:samplewise_noise", "per-pixel uniform +-eps, a pattern "
                              "per image (the random-noise control: not a shortcut)", "cheap", {"budget": "linf"}),
    "lsp": Entry("pst_dist.poison.shortcuts:lsp", "class-wise patch clusters, L2 budget poison.l2", "cheap",
                 {"budget": "l2"}),
    "ar": Entry("pst_dist.poison.shortcuts:ar", "class-wise autoregressive filters, a draw per image, L2 budget",
                "cheap", {"budget": "l2"}),
    "ops": Entry("pst_dist.poison.shortcuts:ops", "one pixel per image, position and colour searched per class "
                 "(L0 = 1)", "cheap", {"budget": "l0"}),
    "conv_blur": Entry("pst_dist.poison.shortcuts:conv_blur", "class-wise random convolution (no Lp bound)", "cheap",
                       {"budget": "none"}),
    # model: fn(images, labels, Config, num_classes) -> (poisoned uint8 images, info dict for poison.json)
    "em": Entry("pst_dist.poison.model_based:em", "error-minimizing noise against a surrogate from [model] "
                "(poison.granularity sample | class)", "model", {"budget": "linf"}),
    "rem": Entry("pst_dist.poison.model_based:rem", "robust EM: min-min-max, adversarial radius poison.adv_eps",
                 "model", {"budget": "linf"}),
    "tap": Entry("pst_dist.poison.model_based:tap", "targeted PGD towards class y+1 against a [model] trained here",
                 "model", {"budget": "linf"}),
})

TRIGGERS = Registry("trigger", {
    # fn(detector values from pst.detectors.probe_metrics, group) -> the value compared with the threshold
    "shortcut_gap": Entry("pst_dist.pst.triggers:shortcut_gap", "acc(probe) - acc(view(probe))"),
    "train_acc": Entry("pst_dist.pst.triggers:train_acc", "accuracy on the (poisoned) probe"),
    "cluster": Entry("pst_dist.pst.triggers:cluster", "between/within scatter ratio of a group's activations"),
})

VIEWS = Registry("view", {
    # fn(x float [0, 1] NCHW, strength) -> x, a perturbation-suppressing view; data "random": draws from torch's
    # global generator (not allowed at evaluation: schedule.eval_views)
    "blur": Entry("pst_dist.pst.views:blur", "Gaussian blur, sigma = strength px"),
    "randblur": Entry("pst_dist.pst.views:random_blur", "a random anisotropic Gaussian per image, sigmas in "
                      "[0, strength] px", data={"random": True}),
    "downup": Entry("pst_dist.pst.views:downup", "average-pool by round(1 + strength), bilinear up"),
    "gray": Entry("pst_dist.pst.views:gray", "channel mean"),
    "jpeg": Entry("pst_dist.pst.views:jpeg", "JPEG at quality round(10 / strength)"),
    "median": Entry("pst_dist.pst.views:median", "median over a (2 round(strength) + 1) px square"),
    "plasma": Entry("pst_dist.pst.views:plasma", "a random fractal brightness field per image, +-strength/10",
                    data={"random": True}),
    "quantize": Entry("pst_dist.pst.views:quantize", "round(2 + 6 / strength) grey levels"),
    "sharpen": Entry("pst_dist.pst.views:sharpen", "unsharp mask: x + strength (x - blur(x, 1 px)), clipped"),
})

_STD = ['schedule.stages=[{name="standard"}]', "schedule.eval_views=[]",  # the recipe's test-time views and
        "schedule.mean_repair=0"]  # data repair are PST's
DEFENSES = Registry("defense", {
    # pure data: the training run a bench defense is read from, and that run's config overrides
    "standard": Entry("", "plain training on the poisoned data", data={"run": "standard", "overrides": _STD}),
    "early_stop": Entry("", "the standard run's test accuracy at its best validation epoch",
                        data={"run": "standard", "overrides": _STD}),
    "jpeg10": Entry("", "ISS: JPEG quality 10 on the training images", data={
        "run": "jpeg10", "overrides": [*_STD, 'defense.kind="jpeg"', "defense.jpeg_quality=10"]}),
    "grayscale": Entry("", "ISS: grayscale training images", data={
        "run": "grayscale", "overrides": [*_STD, 'defense.kind="grayscale"']}),
    "ueraser_lite": Entry("", "UEraser-lite: pst-dist's light hand-written heavy augmentation (data.augment)", data={
        "run": "ueraser_lite", "overrides": [*_STD, 'data.augment="ueraser"']}),
    "ueraser": Entry("", "UEraser(-Max) as APBench: kornia plasma / shuffle / TrivialAugment, max loss over 5 views",
                     data={"run": "ueraser", "overrides": [*_STD, 'defense.kind="ueraser"']}),
    "adv": Entry("", "PGD adversarial training", data={"run": "adv", "overrides": [*_STD, 'defense.kind="adv"']}),
    "pst": Entry("", "the recipe's PST schedule", data={"run": "pst", "overrides": []}),
})

MODEL_FAMILIES = Registry("model family", {
    # fn(ModelConfig, in_chans, img_size) -> (extra timm.create_model kwargs, hook(model) run after creation or None);
    # a timm name is of the first family whose data "prefixes" start it and none of whose "exclude" it contains
    "resnet": Entry("pst_dist.models:resnet_kwargs", "ResNets: 3x3 stem for 28-32 px (model.small_stem), width",
                    data={"prefixes": ("resnet", "resnext", "wide_resnet"), "exclude": ("resnetv2",)}),
    "vit": Entry("pst_dist.models:vit_kwargs", "ViTs: img_size and patch_size from data / model.patch_size",
                 data={"prefixes": ("vit_", "deit_"), "exclude": ()}),
})

TRACKERS = Registry("tracker", {
    # class(run_dir, Config, run id to continue or None) with .id, .log(step, values), .close(failed); opened on rank 0
    # beside TensorBoard; "package" must be importable, "extra" is the pst-dist extra that installs it
    "wandb": Entry("pst_dist.tracking:WandbTracker", "Weights & Biases, offline unless WANDB_MODE says otherwise "
                   "(files in <run_dir>/wandb)", data={"package": "wandb", "extra": "wandb"}),
    "mlflow": Entry("pst_dist.tracking:MlflowTracker", "MLflow: the store log.mlflow_uri names, else a file store in "
                    "<run_dir>/mlruns", data={"package": "mlflow", "extra": "mlflow"}),
})
