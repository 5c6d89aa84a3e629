"""Training throughput of ``pst-dist train`` against bare loops of the same model, data, batch and precision, side by
side in one run: img/s of each and the trainer's ratio to the bare loops. ResNet-18 at 32 px and ViT-B/16 at 224 px on
a GPU; the ViT trainer also through DeepSpeed ZeRO-0 and ZeRO-3 where DeepSpeed is importable. ``--tiny`` runs the
same on the CPU at toy sizes (the test suite does, so the script keeps working where no GPU is).

    .venv/bin/python bench/gpu_throughput.py [--tiny] [--only resnet18|vit] [--epochs 4] [--out results.jsonl]

The trainer runs as users run it on a GPU: its own data path (the in-memory training set held on the GPU; the
``trainer_host_data`` row leaves it on the host behind the prefetching thread), the case's augmentation on the device
(pad-crop + flip for ResNet-18, random resized crop + flip for the ViT), channels-last (auto), ``train.compile=true``
(``--no-compile``: off, and no compiled bare loop), bf16 autocast, fused optimizer.
Bare loops: uint8 data already on the device, pad-crop and flip on the device, the same optimizer (SGD Nesterov for
ResNet-18, AdamW for the ViT), bf16 autocast on a GPU, no host sync per step: eager, channels-last (conv nets), and
compiled (channels-last for conv nets).

Timing: from the end of epoch 1 to the end of epoch E-1 (after ``torch.cuda.synchronize()``): compiling and warm-up
are in epoch 1, and the trainer evaluates and checkpoints only at its last epoch; neither is timed. A case that fails
(e.g. DeepSpeed's ZeRO-3 under torch.compile) is printed and recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pst_dist.config import load_config
from pst_dist.data.pipeline import build_data
from pst_dist.models import build_model
from pst_dist.train import train

CASES = {  # name -> (model, image side, images, batch, model overrides, augmentation, optimizer, lr)
    "resnet18": ("resnet18", 32, 60_000, 512, [], "crop_flip", "sgd", 0.1),
    "vit": ("vit_base_patch16_224", 224, 4_096, 128, ["--model.patch_size=16"], "rrc_flip", "adamw", 1e-3),
}
TINY = {
    "resnet18": ("resnet18", 16, 512, 64, ["--model.width=0.125"], "crop_flip", "sgd", 0.1),
    "vit": ("vit_tiny_patch16_224", 32, 256, 32, ["--model.patch_size=8"], "rrc_flip", "adamw", 1e-3),
}
ZERO = {"trainer_zero0": (0, True), "trainer_zero3": (3, True), "trainer_zero3_eager": (3, False)}
"""The ViT trainer through DeepSpeed (fp32 weights, bf16 autocast): ZeRO stage, compiled (as the trainer's own run;
the eager ZeRO-3 row only where the trainer compiles)."""
TRAINERS = ("trainer", "trainer_host_data", *ZERO)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_compiler() -> None:
    """Forget earlier compiled graphs: each measurement compiles its own model, within its own recompile limit."""
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()


def trainer_throughput(overrides: list[str], epochs: int, device: torch.device, data) -> tuple[float, dict]:
    """img/s of ``pst-dist train`` (its own data path, loop and engine) over epochs 2 .. epochs-1."""
    stamps: list[float] = []

    fresh_compiler()

    def on_epoch(epoch, logs, gm, engine):
        sync(device)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(None, [*overrides, f"--log.run_dir={Path(d) / 'run'}", f"--train.epochs={epochs}"])
        summary = train(cfg, data=data, on_epoch=on_epoch)
        per_epoch = (len(data.splits.train) // cfg.train.batch_size) * cfg.train.batch_size
    timed = stamps[:-1]  # ends of epochs 1 .. E-1: epochs 2 .. E-1 timed (the last one evaluates)
    return per_epoch * (len(timed) - 1) / (timed[-1] - timed[0]), summary


def crop_flip(xp: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A random size x size crop of each padded image and a random horizontal flip, per sample, on its device."""
    n, c, hp, wp = xp.shape
    ar = torch.arange(size, device=xp.device)
    oy = torch.randint(0, hp - size + 1, (n,), device=xp.device, generator=g)
    ox = torch.randint(0, wp - size + 1, (n,), device=xp.device, generator=g)
    cols = ox[:, None] + ar[None]
    cols = torch.where(torch.rand(n, 1, device=xp.device, generator=g) < 0.5, cols.flip(1), cols)
    x = xp.gather(2, (oy[:, None] + ar[None])[:, None, :, None].expand(n, c, size, wp))
    return x.gather(3, cols[:, None, None, :].expand(n, c, size, size))


def bare_throughput(model_cfg_overrides: list[str], size: int, n: int, batch: int, epochs: int, device,
                    channels_last: bool, compile_: bool, bf16: bool, optimizer: str, lr: float,
                    on_epoch=None, fused: bool | None = None) -> float:
    """img/s of a bare loop: the same timm model, uint8 data on the device, crop + flip on the device.
    ``on_epoch(epoch)`` is called after each epoch (1-based), as the trainer's hook is; ``fused``: the optimizer's
    fused kernel (default: on a GPU, as the trainer)."""
    cfg = load_config(None, model_cfg_overrides)
    torch.manual_seed(0)
    # its own settings, as the trainer's defaults on this device (deterministic: auto), not whatever the trainer's
    # row before it left in this process
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    model = build_model(cfg.model, 10, 3, size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if (device.type == "cuda" if fused is None else fused) else {}
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, **fused)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4, **fused)
    fresh_compiler()
    step_model = torch.compile(model) if compile_ else model
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(0, 10, (n,), device=device, generator=g)
    mean, std = torch.full((1, 3, 1, 1), 0.5, device=device), torch.full((1, 3, 1, 1), 0.25, device=device)
    pad = max(1, size // 8)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    stamps = []
    for _ in range(epochs):
        perm = torch.randperm(n, device=device, generator=g)
        for b in range(n // batch):
            idx = perm[b * batch:(b + 1) * batch]
            x = crop_flip(F.pad(images[idx], (pad, pad, pad, pad)), size, g).float()
            x = ((x / 255 - mean) / std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = F.cross_entropy(step_model(x).float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        stamps.append(time.perf_counter())
        if on_epoch is not None:
            on_epoch(len(stamps))
    timed = stamps[:-1]  # ends of epochs 1 .. E-1: epochs 2 .. E-1 timed, as for the trainer
    return (n // batch) * batch * (len(timed) - 1) / (timed[-1] - timed[0])


def attempt(row: dict, label: str, fn, *args) -> None:
    """``row[label] = fn(*args)``, printed at once (a run cut short still shows what it measured); a failure is
    recorded as ``row[label + '_error']`` and printed, not raised."""
    try:
        row[label] = fn(*args)
        print(f"  {row['case']} {label}: {row[label]:,.0f} img/s", flush=True)
    except Exception as e:  # noqa: BLE001 - one failing measurement must not cost the others
        row[f"{label}_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"  {row['case']} {label}: failed ({row[f'{label}_error'][:200]})", flush=True)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure_case(name: str, spec: tuple, device: torch.device, epochs: int, compile_: bool, zero: bool) -> dict:
    """One case: the trainer, the bare loops, then (ViT, DeepSpeed importable) the trainer on ZeRO-0 and ZeRO-3."""
    model, size, n, batch, model_over, augment, optimizer, lr = spec
    bf16 = device.type == "cuda"
    conv = name != "vit"
    base = [f"--model.name={model}", *model_over]
    over = [*base, "--data.source=synthetic", f"--data.synthetic_train={n}", f"--data.img_size={size}",
            "--data.val_size=256", "--data.probe_size=64", f"--data.augment={augment}",
            f"--train.batch_size={batch}", f"--train.bf16={str(bf16).lower()}",
            f"--train.optimizer={optimizer}", f"--train.lr={lr}", f"--train.compile={str(compile_).lower()}",
            f"--train.eval_every={epochs}", "--train.checkpoint_every=0", "--log.tensorboard=false",
            "--log.progress=false", f"--train.device={device.type}"]
    data = build_data(load_config(None, over))
    row: dict = {"case": name, "model": model, "size": size, "images": n, "batch": batch, "device": str(device),
                 "bf16": bf16, "augment": augment, "optimizer": optimizer, "trainer_compiled": compile_,
                 "torch": torch.__version__}
    summaries: dict[str, dict] = {}

    def run_trainer(label: str, extra: list[str]) -> float:
        ips, summaries[label] = trainer_throughput([*over, *extra], epochs, device, data)
        return ips

    attempt(row, "trainer", run_trainer, "trainer", [])
    if conv and device.type == "cuda":  # the same run with the training set left on the host (prefetch thread)
        attempt(row, "trainer_host_data", run_trainer, "trainer_host_data", ["--data.on_device=false"])
    if "trainer" in summaries:
        row["trainer_throughput"] = summaries["trainer"].get("throughput", {})
    bare = [("bare_eager", False, False)]
    if conv:
        bare.append(("bare_channels_last", True, False))
    if compile_:
        bare.append(("bare_compiled", conv, True))
    for label, cl, comp in bare:
        attempt(row, label, bare_throughput, base, size, n, batch, epochs, device, cl, comp, bf16, optimizer, lr)
    if zero and not conv:
        for label, (stage, comp) in ZERO.items():
            if comp or compile_:
                attempt(row, label, run_trainer, label, ["--deepspeed.enabled=true", f"--deepspeed.zero_stage={stage}",
                                                         f"--train.compile={str(comp and compile_).lower()}"])
    for t in [k for k in TRAINERS if k in row]:
        for b in [k for k in row if k.startswith("bare_") and not k.endswith("_error")]:
            row[f"{t}_vs_{b}"] = row[t] / row[b]
    if device.type == "cuda":
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (what the test suite runs)")
    ap.add_argument("--only", choices=sorted(CASES), action="append", help="run only this case (repeatable)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per measurement (>= 3; 2 .. E-1 are timed)")
    ap.add_argument("--no-compile", action="store_true", help="the trainer eager, and no compiled bare loop")
    ap.add_argument("--no-zero", action="store_true", help="skip the DeepSpeed ZeRO-0 / ZeRO-3 trainer rows")
    ap.add_argument("--out", help="append one JSON line per case here")
    args = ap.parse_args(argv)
    if args.epochs < 3:
        ap.error(f"--epochs {args.epochs}: need >= 3 (epoch 1 warms up, the last evaluates, those between are timed)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    compile_ = not (args.no_compile or args.tiny)  # compiling on the CPU takes minutes: not in --tiny
    zero = importlib.util.find_spec("deepspeed") is not None and not args.no_zero
    rows = []
    for name in args.only or sorted(CASES):
        row = measure_case(name, (TINY if args.tiny else CASES)[name], device, args.epochs, compile_, zero)
        rows.append(row)
        best = "bare_compiled" if "bare_compiled" in row else "bare_eager"
        for t in [k for k in TRAINERS if f"{k}_vs_{best}" in row]:
            print(f"{name}: {t} / {best} = x{row[f'{t}_vs_{best}']:.2f}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
