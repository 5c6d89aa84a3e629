"""Model-based poisons, written from their papers' ideas: EM (error-minimizing noise, Huang et al. 2021; sample-wise
or class-wise; bi-level min-min against a surrogate), REM (robust EM, Fu et al. 2022: min-min-max, the noise must
keep the error low even under an adversarial perturbation of radius ``adv_eps``) and TAP (targeted adversarial
poisoning, Fowl et al. 2021: targeted PGD towards a permuted class against a model trained here on the clean data).

The surrogate comes from the model factory (``[model]``), on the training device (``train.device``), with the
trainer's bf16 autocast (``train.bf16``). Under a process group (``torchrun``/DeepSpeed launch) the work is
data-parallel like training: surrogate gradients and BatchNorm buffers are averaged / broadcast, each rank perturbs
its share of the images and the shares are summed back, so every rank ends with the same poison.

Each returns poisoned uint8 images, deterministic from ``poison.seed`` (on one device type and process count), and
asserts the L-inf budget on what it returns."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..config import Config
from ..data.loaders import apply_params, draw_params, to_device
from ..defenses import pgd_examples
from ..distributed import all_reduce_grads, broadcast_buffers, build_device
from ..models import build_model
from .budget import add_levels, check_linf, linf_levels


class _Seams:
    """Device, autocast and the process group the attack runs under, as in training."""

    def __init__(self, cfg: Config):
        self.device = build_device(cfg)
        self.bf16 = cfg.train.bf16
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def _surrogate(cfg: Config, num_classes: int, shape: tuple[int, int, int], seams: _Seams, seed: int):
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes, shape[0], shape[1]).to(seams.device)
    p = cfg.poison
    opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=0.9, weight_decay=5e-4)
    return model, opt


def _batches(n: int, batch: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches forever (a new permutation per pass), the same on every rank."""
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[i: i + batch]


class _Attack:
    """Shared state: the images (uint8 on the device, as floats in [0, 1] a batch at a time: an ImageNet-sized
    split held as floats would take 4x its bytes of device memory for the whole attack), labels, normalisation, the
    surrogate and its steps."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: Config, num_classes: int):
        self.p = cfg.poison
        self.seams = _Seams(cfg)
        dev = self.seams.device
        self.u8 = images.to(dev)
        self.y = labels.to(dev)
        self.n = len(labels)
        x = self.u8.float().div_(255)  # the statistics over all of it, then freed
        mean = x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)
        del x
        self.normalize = lambda t: (t - mean) / std
        self.g = torch.Generator().manual_seed(self.p.seed)
        self.model, self.opt = _surrogate(cfg, num_classes, tuple(images.shape[1:]), self.seams, self.p.seed)
        self.bs = min(self.p.batch_size, self.n)
        self.stream = _batches(self.n, self.bs, self.g)
        self.aug_mode = "none"  # em/rem with poison.eot: the training's augmentation
        self.aug_g = torch.Generator().manual_seed(self.p.seed + 1_000_003 * (self.seams.rank + 1))

    def xs(self, rows) -> torch.Tensor:
        """The images ``rows`` (indices or a slice) as floats in [0, 1]."""
        return self.u8[rows].float() / 255

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (floats) augmented by ``aug_mode``, differentiably, with this rank's own random numbers."""
        dev = self.seams.device
        params = draw_params(self.aug_mode, tuple(x.shape), self.aug_g, dev)
        return apply_params(x, self.aug_mode, to_device(params, dev))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with self.seams.autocast():
            return self.model(self.normalize(x)).float()

    def my_share(self, idx: torch.Tensor) -> torch.Tensor:
        return idx[self.seams.rank:: self.seams.world]

    def train_steps(self, steps: int, delta_of, inputs_of=None) -> None:
        """``steps`` SGD steps of the surrogate on poisoned batches (``delta_of(idx, x)`` gives their perturbation;
        ``inputs_of(idx, x)``, if given, the whole batch to train on instead)."""

        self.model.train()
        for _ in range(steps):
            idx = self.my_share(next(self.stream))
            idx_d = idx.to(self.seams.device)
            xb = self.xs(idx_d)
            xb = (inputs_of(idx_d, xb) if inputs_of else (xb + delta_of(idx_d, xb)).clamp(0, 1)).detach()
            loss = F.cross_entropy(self.logits(xb), self.y[idx_d])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.seams.world > 1:
                all_reduce_grads(self.model.parameters(), self.seams.world)
            self.opt.step()
        broadcast_buffers(self.model)

    def input_grad(self, xb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        xb = xb.clamp(0, 1).detach().requires_grad_(True)
        loss = F.cross_entropy(self.logits(xb), target)
        (grad,) = torch.autograd.grad(loss, xb)
        return grad

    @torch.no_grad()
    def rate(self, delta_of, want: torch.Tensor, idx: torch.Tensor | None = None) -> float:
        """Share of the perturbed images (``idx``: a subset) the surrogate (eval mode) assigns to class ``want``,
        over all ranks' shares."""
        self.model.eval()
        idx = torch.arange(self.n) if idx is None else idx
        hits = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(idx), 1024):
            b = self.my_share(idx[i: i + 1024]).to(self.seams.device)
            xb = self.xs(b)
            xb = (xb + delta_of(b, xb)).clamp(0, 1)
            hits += torch.tensor([float((self.logits(xb).argmax(1) == want[b]).sum()), float(len(b))],
                                 dtype=torch.float64)
        hits = self.seams.sum_(hits)
        return float(hits[0] / hits[1].clamp_min(1))

    def error(self, delta_of, idx: torch.Tensor | None = None) -> float:
        """Surrogate error on the poisoned images (``idx``: a subset)."""
        return 1 - self.rate(delta_of, self.y, idx)

    def merge_shares(self, delta: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        """Each rank perturbed only its own rows (``mine``): sum the shares so every rank holds all of them."""
        if self.seams.world == 1:
            return delta
        return self.seams.sum_(delta * mine.view(-1, *([1] * (delta.ndim - 1))))

    def finish(self, images: torch.Tensor, delta_of_rows, name: str, info: dict
               ) -> tuple[torch.Tensor, dict]:
        """The poisoned uint8 images (budget asserted) and what the attack did (rounds, errors: for poison.json);
        ``delta_of_rows(rows)``: the final perturbation of a slice of rows, rounded and added a chunk at a time."""
        budget = linf_levels(self.p.eps)
        out = add_levels(images, lambda rows: (delta_of_rows(rows).cpu() * 255).round().clamp(-budget, budget)
                         .to(torch.int16))
        check_linf(images, out, self.p.eps, name)
        return out, {"attack": name, **info}


def _project(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Into the L-inf ball and the valid pixel range."""
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1) - x


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[poison] {msg}", file=sys.stderr, flush=True)


def _use_eot(a: _Attack, cfg: Config) -> None:
    """With poison.eot: the attack augments as the training does (``data.augment``), differentiably."""
    if cfg.poison.eot:  # data.augment is one it supports (Config checks it)
        a.aug_mode = cfg.data.augment


def _step_size(p, default_fraction: float) -> float:
    return p.step_size if p.step_size > 0 else p.eps * default_fraction


def em(images: torch.Tensor, labels: torch.Tensor, cfg: Config, num_classes: int, robust: bool = False
       ) -> tuple[torch.Tensor, dict]:
    """EM (``robust``: REM). Rounds of: ``train_steps`` surrogate steps on the poisoned data (REM: on its PGD
    examples of radius ``adv_eps``), then ``steps`` signed-gradient descent steps of size ``step_size`` on the noise
    for every image (REM: each step against a fresh PGD example), until the surrogate's error on the poisoned data
    (REM: robust error on a fixed subset) is at most ``stop_error`` or ``max_rounds`` have run.

    With ``eot`` > 0 (Expectation over Transformation, REM's reference): the surrogate trains on batches augmented
    as training augments them (``data.augment``: crop or crop_flip), and each noise step follows the gradient
    summed over ``eot`` augmented copies of every image (REM: each with its own PGD example), through the
    augmentation; a noise step then costs ``eot`` times as much."""
    t0 = time.time()
    a = _Attack(images, labels, cfg, num_classes)
    p, dev = a.p, a.seams.device
    name = "rem" if robust else "em"
    _use_eot(a, cfg)
    classwise = p.granularity == "class"
    alpha = _step_size(p, 0.1)
    # uniform random start in the ball (as EM's reference does), drawn on the CPU from the poison's seed
    shape = (num_classes if classwise else a.n, *images.shape[1:])
    delta = torch.rand(shape, generator=a.g).mul_(2).sub_(1).mul_(p.eps).to(dev)  # in place: one copy of the split
    adv = (p.adv_eps, 2.5 * p.adv_eps / p.adv_steps, p.adv_steps)  # PGD radius, step, steps of the inner max

    def delta_of(idx: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        d = delta[a.y[idx]] if classwise else delta[idx]
        return _project(d, xb, p.eps)

    def robust_of(idx: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """REM: the poisoned batch's PGD example, as an offset from the clean batch."""
        xu = (xb + delta_of(idx, xb)).clamp(0, 1)
        with torch.enable_grad():
            return pgd_examples(a.model, xu, a.y[idx], a.normalize, *adv) - xb

    def train_inputs(idx: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        """EOT: the surrogate's batch: the augmented poisoned images (REM: their PGD examples)."""
        xu = a.augment((xb + delta_of(idx, xb)).clamp(0, 1))
        if not robust:
            return xu
        with torch.enable_grad():
            return pgd_examples(a.model, xu, a.y[idx], a.normalize, *adv)

    train_delta = robust_of if robust else delta_of
    passes = (1 + p.adv_steps) if robust else 1  # forward-backward passes per image and gradient
    _log(f"{name}: per round {p.train_steps} surrogate steps x {passes} passes of {a.bs} images, then {p.steps} noise "
         f"steps x {max(1, p.eot)} copies x {passes} passes for each of the {a.n} images")
    check_idx = torch.randperm(a.n, generator=a.g)[: min(a.n, p.check_size)] if robust else None
    err, rounds = 1.0, 0
    bar = _progress(p.max_rounds, f"{name} rounds")
    for r in range(1, p.max_rounds + 1):
        rounds = r
        a.train_steps(p.train_steps, train_delta, train_inputs if p.eot else None)
        a.model.eval()
        order = torch.randperm(a.n, generator=a.g)
        nb = max(1, a.n // a.bs) if classwise else math.ceil(a.n / a.bs)
        mine = torch.zeros(a.n, dtype=torch.bool, device=dev)
        for bi in range(nb):
            idx = order[bi * a.bs: (bi + 1) * a.bs]
            b = a.my_share(idx).to(dev)
            mine[b] = True
            xb, yb = a.xs(b), a.y[b]
            d = (delta[yb] if classwise else delta[b]).clone()
            for _ in range(p.steps):
                if p.eot:
                    g = sum(_eot_grad(a, xb, _project(d, xb, p.eps), yb, adv if robust else None)
                            for _ in range(p.eot))
                elif robust:  # the noise must keep the loss low at a PGD example around the poisoned image
                    xu = (xb + _project(d, xb, p.eps)).clamp(0, 1).detach()
                    xadv = pgd_examples(a.model, xu, yb, a.normalize, *adv)
                    g = _grad_through(a, xb, d, xadv - xu, yb)
                else:
                    g = a.input_grad(xb + _project(d, xb, p.eps), yb)
                if classwise:  # one step per class from the summed gradient of its images (all ranks)
                    gc = a.seams.sum_(torch.zeros_like(delta).index_add_(0, yb, g))
                    delta = (delta - alpha * gc.sign()).clamp(-p.eps, p.eps)
                    d = delta[yb]
                else:
                    d = _project(d - alpha * g.sign(), xb, p.eps)
            if not classwise:
                delta[b] = d
        if not classwise:  # class noise is already shared (its gradients were summed over ranks)
            delta = a.merge_shares(delta, mine)
        err = a.error(train_delta, check_idx)
        bar.update(1)
        bar.set_postfix({"train_error": f"{err:.4f}"})
        if err <= p.stop_error:
            break
    bar.close()
    stopped = "reached" if err <= p.stop_error else "not reached (max_rounds)"
    _log(f"{name}: {rounds} rounds, surrogate {'robust ' if robust else ''}train error {err:.4f} "
         f"(stop_error {p.stop_error}: {stopped}), {time.time() - t0:.1f} s")
    return a.finish(images, lambda rows: _project(delta[a.y[rows]] if classwise else delta[rows], a.xs(rows), p.eps),
                    name, dict(rounds=rounds, train_error=err, stop_error_reached=err <= p.stop_error,
                               seconds=round(time.time() - t0, 2)))


def _grad_through(a: _Attack, xb: torch.Tensor, d: torch.Tensor, adv_offset: torch.Tensor, yb: torch.Tensor
                  ) -> torch.Tensor:
    """d/dd of the cross-entropy at x + d + (fixed) adversarial offset: REM's outer minimisation step."""
    d = d.detach().requires_grad_(True)
    loss = F.cross_entropy(a.logits((xb + d + adv_offset).clamp(0, 1)), yb)
    (g,) = torch.autograd.grad(loss, d)
    return g


def _eot_grad(a: _Attack, xb: torch.Tensor, d: torch.Tensor, yb: torch.Tensor, adv: tuple | None) -> torch.Tensor:
    """d/dd of the cross-entropy at one augmented copy of x + d (``adv``: at its PGD example, the adversarial offset
    held fixed, as REM's outer step), through the augmentation."""
    d = d.detach().requires_grad_(True)
    xu = a.augment((xb + d).clamp(0, 1))
    if adv is not None:
        xu = xu + (pgd_examples(a.model, xu.detach(), yb, a.normalize, *adv) - xu.detach())
    loss = F.cross_entropy(a.logits(xu), yb)
    (g,) = torch.autograd.grad(loss, d)
    return g


def rem(images: torch.Tensor, labels: torch.Tensor, cfg: Config, num_classes: int) -> tuple[torch.Tensor, dict]:
    return em(images, labels, cfg, num_classes, robust=True)


def tap(images: torch.Tensor, labels: torch.Tensor, cfg: Config, num_classes: int) -> tuple[torch.Tensor, dict]:
    """TAP: train the factory model on the clean images for ``model_epochs`` epochs (SGD, cosine lr), then for
    every image ``steps`` targeted signed-gradient steps of ``step_size`` towards class (y + 1) mod K. With
    ``ensemble`` > 1 it trains that many models (each its own init and data order) and steps on their mean logits.

    With ``eot`` > 0 (TAP's reference crafts through differentiable augmentation): the model trains on batches
    augmented as data.augment does, and each step follows the targeted gradient summed over ``eot`` augmented copies
    of the image, through the augmentation (a step costs eot times as much)."""
    t0 = time.time()
    a = _Attack(images, labels, cfg, num_classes)
    p, dev = a.p, a.seams.device
    _use_eot(a, cfg)
    augmented = (lambda idx, xb: a.augment(xb)) if p.eot else None
    steps_per_epoch = max(1, a.n // a.bs)
    total = p.model_epochs * steps_per_epoch
    zero = lambda idx, xb: torch.zeros_like(xb)
    members = []
    for k in range(p.ensemble):  # member 0 is the one model of ensemble=1; the others draw their own init
        if k:
            a.model, a.opt = _surrogate(cfg, num_classes, tuple(images.shape[1:]), a.seams, p.seed + 7919 * k)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(a.opt, max(1, total))
        member = f" {k + 1} of {p.ensemble}" if p.ensemble > 1 else ""
        bar = _progress(p.model_epochs, f"tap: training its model{member}")
        for _ in range(p.model_epochs):
            for _ in range(steps_per_epoch):
                a.train_steps(1, zero, augmented)
                sched.step()
            bar.update(1)
        bar.close()
        members.append(a.model)
    if p.ensemble > 1:
        a.model = _MeanLogits(members)
    clean_err = a.error(zero)
    alpha = _step_size(p, 0.25)
    a.model.eval()
    delta = torch.zeros(a.u8.shape, device=dev)
    target = (a.y + 1) % num_classes
    mine = torch.zeros(a.n, dtype=torch.bool, device=dev)
    for i in range(0, a.n, a.bs):
        b = a.my_share(torch.arange(i, min(a.n, i + a.bs))).to(dev)
        mine[b] = True
        xb = a.xs(b)
        d = torch.zeros_like(xb)
        for _ in range(p.steps):
            if p.eot:
                g = sum(_eot_grad(a, xb, d, target[b], None) for _ in range(p.eot))
            else:
                g = a.input_grad(xb + d, target[b])
            d = _project(d - alpha * g.sign(), xb, p.eps)
        delta[b] = d
    delta = a.merge_shares(delta, mine)
    hit = a.rate(lambda idx, xb: delta[idx], target)
    _log(f"tap: model clean train error {clean_err:.4f}; targeted success {hit:.4f}; {time.time() - t0:.1f} s")
    return a.finish(images, lambda rows: delta[rows], "tap", dict(model_train_error=clean_err, target_success=hit,
                                                seconds=round(time.time() - t0, 2)))


class _MeanLogits(torch.nn.Module):
    """TAP's ensemble: the mean of its members' logits (the targeted loss is taken on them)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).float() for m in self.members]).mean(0)  # bf16 autocast: averaged in float32


def _progress(total: int, desc: str):
    quiet = dist.is_initialized() and dist.get_rank() != 0
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False)
