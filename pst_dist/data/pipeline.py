"""The data path in one place: source -> poison -> defense squeeze -> the ``Data`` the loop trains on, the loader
over it, and the two commands that write the configured data to disk (``pst-dist poison``: a poison store;
``pst-dist write-beton``: FFCV files). Everything here sits below the training loop and above the sources, poisons
and file formats it combines."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, ConfigError, DataConfig, device_type
from ..defenses import SQUEEZES, squeeze_train
from ..distributed import DistInfo, build_device, rank_and_size, sum_across_ranks
from ..io import check_out_dir, enter_out_dir, sha256, write_failed
from ..metrics import machine_facts
from ..poison import make_poison, mix_clean, norms, poison_train, store
from . import beton
from .beton import BetonDir
from .loaders import FolderBatches, TensorBatches
from .sources import (
    DataError,
    Fingerprint,
    FolderListing,
    FolderSplit,
    PixelSums,
    Split,
    Splits,
    channel_stats,
    decoded,
    fingerprint,
    folder_stats,
    list_folder,
    load_splits,
    load_streamed_splits,
    raise_first,
)


@dataclass
class Data:
    splits: Splits
    poisoned_train: torch.Tensor  # uint8, what the model is trained on (.beton, streamed folder: the first images only)
    mean: torch.Tensor
    std: torch.Tensor
    beton: BetonDir | None = None  # when the training split lives in a .beton (read by FFCV)
    stream: FolderSplit | None = None  # when the training split stays in its image folder (data.stream)
    train_sha256: str | None = None  # a streamed training split's fingerprint, when build_data was asked (digest)
    folder: dict | None = None  # an image folder's listing: FolderListing.fingerprint() (sha256s, file count)
    poison_sha256: str | None = None  # a poison read from files (poison.kind = "file"): its images' fingerprint
    poison_path: str | None = None  # ... and where it was read (a bench cell's config names its attack instead)


class Normalize:
    """(x - mean) / std, cast to ``dtype`` (the model's own dtype when DeepSpeed holds bf16 / fp16 weights), in
    channels-last memory format with ``channels_last`` (for a model converted to it)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False):
        self.mean, self.std = mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)
        self.dtype, self.channels_last = dtype, channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.mean) / self.std).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def build_data(cfg: Config, poisoned: torch.Tensor | None = None, digest: bool = False,
               recorded: dict | None = None, keep_clean: bool = True) -> Data:
    """The splits and the training images the model sees: ``cfg.poison`` applied (or ``poisoned``, the same
    training split already poisoned, every image), to the fraction ``poison.ratio`` of the images
    (:mod:`pst_dist.poison.partial`; the others clean), then ``cfg.defense``'s squeezing. ``digest``: a streamed
    image folder's statistics pass also computes its training split's fingerprint (``Data.train_sha256``).
    ``recorded``: a resumed run's recorded inputs (meta.json): an image folder is refused, before anything is
    decoded, unless it lists as when the run started (:func:`check_same_folder`), and then a streamed one skips its
    statistics pass. ``keep_clean=False`` (training, which reads only the poisoned copy): once a poison or a
    squeezing defense has made that copy, the clean training images are let go (an ImageNet-sized split is GBs in
    every process) and ``splits.train.images`` is a meta tensor of their shape, which fails on any read of its
    values."""
    listing, stream = folder_plan(cfg)  # first: refuses data.stream=true where nothing streams
    folder = listing.fingerprint() if listing is not None else None
    same = check_same_folder(recorded, folder, cfg.data)
    if stream:
        return streamed_data(cfg, listing, folder, digest, recorded if same else None)
    if cfg.data.source == "beton":
        if cfg.defense.kind != "none":
            raise ConfigError(f"defense.kind={cfg.defense.kind!r} with data.source='beton': the .beton holds the "
                              f"training images as written; train from the data set's own source with the defense")

        return beton_data(cfg)
    splits = load_splits(cfg.data, listing)
    tr = splits.train
    if poisoned is None:
        poisoned = poison_train(tr.images, tr.labels, tr.index, splits.source_train_size, cfg.poison,
                                splits.num_classes, full=cfg)
    elif poisoned.shape != tr.images.shape or poisoned.dtype != torch.uint8:
        raise DataError(f"poisoned training images: expected uint8 {tuple(tr.images.shape)}, found "
                         f"{poisoned.dtype} {tuple(poisoned.shape)}")
    # files can change between a run's segments, a poison made from the config cannot: a resume compares this
    poison_sha256 = fingerprint(Split(poisoned, tr.labels)) if cfg.poison.kind == "file" else None
    poisoned, k = mix_clean(poisoned, tr.images, tr.index, splits.source_train_size, cfg.poison)
    if k < len(tr):
        print(f"[poison] poison.ratio={cfg.poison.ratio}: {k} of {len(tr)} training images poisoned "
              f"({cfg.poison.kind}), the other {len(tr) - k} clean; rows drawn from poison.seed={cfg.poison.seed}",
              file=sys.stderr)
    elif cfg.poison.kind != "none":  # which poison the run reads, said once at its start (a typo'd path is refused)
        source = f" from {cfg.poison.path}" if cfg.poison.kind == "file" else f" (poison.seed={cfg.poison.seed})"
        print(f"[poison] {cfg.poison.kind} on all {len(tr)} training images{source}", file=sys.stderr)
    poisoned = squeeze_train(poisoned, cfg.defense)  # a baseline defense on the training images (none by default)
    # refuses a constant channel (std 0 would train to NaN); an image folder's figures are those a streamed read of
    # it gets (exact sums), other sources' those the trainer always had
    mean, std = (folder_stats if cfg.data.source == "imagefolder" else channel_stats)(tr.images)
    if not keep_clean and poisoned is not tr.images:
        splits.train = Split(torch.empty(tr.images.shape, dtype=torch.uint8, device="meta"), tr.labels, tr.index)
    return Data(splits, poisoned, mean, std.clamp_min(1e-3), folder=folder, poison_sha256=poison_sha256,
                poison_path=cfg.poison.path if poison_sha256 is not None else None)


def folder_change(was: dict, now: dict) -> str | None:
    """How an image folder's listing ``now`` differs from the one recorded, ``was`` (both
    :meth:`pst_dist.data.sources.FolderListing.fingerprint`): None, not at all; ``"times"``, the same files (names,
    labels, sizes) with other modification times; ``"files"``, files added, removed, renamed or resized."""
    if was.get("sha256") == now["sha256"]:
        return None
    return "times" if was.get("sizes_sha256") == now["sizes_sha256"] else "files"


def _one_answer(problem: str | None, others: str, flags: tuple[int, ...] = ()) -> list[int]:
    """Every rank stops together: DataError(``problem``) on each rank that found one, and on the others a DataError
    saying how many ranks found ``others`` (a rank that went on alone would wait for the rest forever in the next
    collective). ``flags``: integers summed over the ranks on the way (returned; as given on one process)."""
    sums = list(flags)
    if rank_and_size()[1] > 1:  # every rank calls this, whatever it found
        refusing, *sums = sum_across_ranks([int(problem is not None), *flags])
        if refusing and problem is None:
            raise DataError(f"--resume: {refusing} other rank(s) found {others} (each says how in its own output)")
    if problem is not None:
        raise DataError(problem)
    return sums


def check_same_folder(recorded: dict | None, folder: dict | None, d: DataConfig) -> bool:
    """On a resume (``recorded``: the run's recorded inputs; None otherwise): DataError, on every rank together,
    unless the image folder lists as it did when the run started (meta.json's ``inputs.folder``). Each segment lists
    the folder afresh, so a file changed, added or removed between two segments would otherwise go unnoticed. The
    same files with other modification times (a copy that did not keep them, or files rewritten at their size) are
    refused too, unless ``data.verify`` is false. Returns whether the folder lists exactly as recorded on every rank
    (a streamed resume then makes no statistics pass); runs from before the listing was recorded, and other sources,
    are not checked."""
    if recorded is None:
        return False
    was = recorded.get("folder")
    checked = was is not None and folder is not None
    change = folder_change(was, folder) if checked else None
    same, problem = checked and change is None, None
    if change == "files":
        problem = (f"files added, removed, renamed or resized ({was.get('files')} files then, {folder['files']} "
                   f"now). A resumed run must train on what it started on: restore the folder, or start a new run "
                   f"(another log.run_dir)")
    elif change == "times" and d.verify:
        problem = ("the same files (names, sizes), but not all with the modification times recorded: rewritten in "
                   "place, or a copy that did not keep them (cp -p, rsync -t keep them). If the files are the same, "
                   "resume with data.verify=false (they are then decoded and checked again); otherwise restore the "
                   "folder, or start a new run (another log.run_dir)")
    said = None if problem is None else (f"--resume: the image folder data.root={d.root!r} is not as this run "
                                         f"started on it: {problem}")
    alike = _one_answer(said, f"the image folder data.root={d.root!r} changed since the run started", (int(same),))
    return alike[0] == rank_and_size()[1]


def check_same_poison(recorded: dict | None, data: Data, cfg: Config) -> None:
    """On a resume (``recorded``: the run's recorded inputs): DataError, on every rank together, unless a poison read
    from files (``poison.path``; a bench's or search's cached store) is the one the run started on (meta.json's
    ``inputs.poison_sha256``): a store written again with ``pst-dist poison --overwrite`` between two segments passes
    its own checks, and the run would train on another poison under the same config. Runs from before the
    fingerprint was recorded are not checked."""
    was = (recorded or {}).get("poison_sha256")
    differ = was is not None and data.poison_sha256 is not None and was != data.poison_sha256
    _one_answer(f"--resume: the poison read from {data.poison_path} is not the one the run in {cfg.log.run_dir} "
                f"started on (its training images' fingerprint {data.poison_sha256[:12]}... now, {was[:12]}... "
                f"then). A resumed run must train on what it started on: restore the poison, or train the run again "
                f"from its start (--overwrite, or another log.run_dir; in a bench, remove that cell's directory)"
                if differ else None, f"the poison read from {data.poison_path} not the run's")


def beton_digests(data: Data, hashed: bool = False) -> dict | None:
    """The SHA-256 of each .beton split the data reads (beton.json's, checked against the files unless data.verify
    is false; ``hashed``: the files' own, read now): meta.json's ``inputs.beton``, what a resume and an evaluation
    compare. None for other sources."""
    if data.beton is None:
        return None
    if hashed:
        return {n: sha256(data.beton.root / f"{n}.beton") for n in beton.SPLITS}
    return {n: data.beton.meta["splits"][n]["sha256"] for n in beton.SPLITS}


def beton_change(was: dict | None, now: dict | None) -> str | None:
    """Which .beton splits differ from those a run recorded (``was``: meta.json's ``inputs.beton``), e.g.
    ``"train.beton, val.beton"``; None when none does, or when there is nothing to compare (another source, or a
    run from before the digests were recorded)."""
    if not was or not now:
        return None
    changed = [f"{n}.beton" for n in beton.SPLITS if was.get(n) != now.get(n)]
    return ", ".join(changed) or None


def check_same_beton(recorded: dict | None, data: Data, cfg: Config, moved: bool = False) -> None:
    """On a resume (``recorded``: the run's recorded inputs): DataError, on every rank together, unless the .beton
    files in data.root are the ones the run started on (meta.json's ``inputs.beton``): ``pst-dist write-beton
    --overwrite`` between two segments (another poison, another data set), or a relative data.root that names
    another directory from here, passes every check of the files themselves, and the run would go on training on
    other data under the same config. ``moved``: data.root is not where the run started, so the files are hashed
    now even with data.verify false (beton.json's figures alone would vouch for the files beside it). Runs from
    before the digests were recorded are not checked."""
    if data.beton is None:  # data.source is the same on every rank: all return here together
        return
    changed = beton_change((recorded or {}).get("beton"), beton_digests(data, hashed=moved and not cfg.data.verify))
    _one_answer(f"--resume: the .beton data in data.root={cfg.data.root!r} is not what the run in {cfg.log.run_dir} "
                f"started on ({changed}: other SHA-256 than recorded, written again since; a file written again "
                f"holds its pages in another order even from the same images). A resumed run must train on what it "
                f"started on: restore the files, or train the run again from its start (--overwrite, or another "
                f"log.run_dir)" if changed is not None else None,
                f"the .beton data in data.root={cfg.data.root!r} changed since the run started")


def streams(cfg: Config) -> bool:
    """data.stream: is the training split read from its image folder batch by batch? (:func:`folder_plan`)"""
    return folder_plan(cfg)[1]


def folder_plan(cfg: Config) -> tuple[FolderListing | None, bool]:
    """(the image folder's listing, None for other sources; whether its training split is read batch by batch,
    data.stream). ``auto`` streams an image folder that holds its data as trained on (no poison, no image-rewriting
    defense) whose decoded training split, one copy per process on this node, would take over a quarter of the
    memory available. ConfigError for ``true`` where it cannot stream, naming the setting in the way."""
    d = cfg.data
    if d.source != "imagefolder":
        if d.stream is True:
            raise ConfigError(f"data.stream=true: only data.source='imagefolder' streams (found {d.source!r}; a "
                              f".beton streams through FFCV, the other sources are read into memory)")
        return None, False
    applied = [f"{k}={v!r}" for k, v, made in (("poison.kind", cfg.poison.kind, cfg.poison.kind != "none"),
                                              ("defense.kind", cfg.defense.kind, cfg.defense.kind in SQUEEZES)) if made]
    if applied and d.stream is True:
        raise ConfigError(f"data.stream=true with {applied[0]}: it rewrites the whole training split in memory "
                          f"before training; stream a folder that already holds the data as trained on, or set "
                          f"data.stream=false")
    if d.stream is True and d.on_device is True:
        raise ConfigError("data.stream=true with data.on_device=true: a streamed training split stays on disk, so it "
                          "cannot be held on the GPU; set one of them to false (or data.on_device=auto)")
    listing = list_folder(d)
    if d.stream != "auto" or applied:  # set, or nothing to choose
        return listing, d.stream is True
    need = listing.part("train").decoded_bytes() * local_processes()
    stream = need > available_memory() / 4
    if rank_and_size()[1] > 1:  # one decision for every rank (each measured its own node): the pass is collective
        stream = sum_across_ranks([int(stream)])[0] > 0
    if stream and d.on_device is True and device_type(cfg) == "cuda":  # on_device never applies on the CPU
        raise ConfigError(f"data.on_device=true: data.stream=auto streams this training split from disk (decoded, "
                          f"{need / 2**30:.1f} GiB for {local_processes()} process(es) on this node; streamed when "
                          f"that is over a quarter of the memory available on any node), so it cannot be held on the "
                          f"GPU; set data.stream=false to hold it in memory anyway, or data.on_device=auto")
    return listing, stream


def local_processes() -> int:
    """Processes on this node that each hold a copy of the data: the launcher's count (torchrun and Ray Train:
    LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE; Open MPI, Slurm), 1 without one."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        with contextlib.suppress(ValueError):
            if os.environ.get(key):
                return max(1, int(os.environ[key]))
    return 1


def available_memory() -> int:
    """Bytes of memory available to new allocations: MemAvailable in /proc/meminfo (free pages elsewhere), or less
    under a cgroup (v2) memory limit (a container, a Slurm job)."""
    avail = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min([avail, *_cgroup_room()])


def _cgroup_room(root: Path = Path("/sys/fs/cgroup"), own_group: Path = Path("/proc/self/cgroup")) -> list[int]:
    """Bytes left under each cgroup v2 memory limit on this process's group and its parents (none: no limit)."""
    try:
        own = next(line[3:] for line in own_group.read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        return []
    group, room = root / own.strip().lstrip("/"), []
    for cg in (group, *group.parents):
        with contextlib.suppress(OSError, ValueError):
            limit = (cg / "memory.max").read_text().strip()
            if limit != "max":
                room.append(int(limit) - int((cg / "memory.current").read_text()))
        if cg == root:
            break
    return room


def streamed_data(cfg: Config, listing: FolderListing, folder: dict, digest: bool = False,
                  known: dict | None = None) -> Data:
    """``Data`` for a streamed image folder: validation and test in memory, the training split on disk (its first
    images decoded for the detectors' probe and the sample grid), its mean and std from one pass over every file,
    which also decodes (checks) each of them before training starts; the pass is shared out among the ranks of a
    process group (exact integer sums, added up across them). With ``digest`` (one process: write-beton), also the
    training split's :func:`pst_dist.data.sources.fingerprint` (``Data.train_sha256``). ``folder``: the listing's
    fingerprint (``Data.folder``). ``known``: a resumed run's recorded inputs, whose folder lists exactly as it does
    now on every rank (:func:`check_same_folder`): its mean and std, and no pass (the run's first segment checked
    every file, and none has changed since)."""
    d = cfg.data
    splits, files = load_streamed_splits(d, head=max(d.probe_size, 64), listing=listing)
    rank, world = (0, 1) if digest else rank_and_size()
    if known is not None:
        if rank == 0:
            print(f"[data] --resume: streaming the {len(files)} training images; the folder lists as when the run "
                  f"started (every file's name, size and modification time), which checked each file: no "
                  f"statistics pass, the recorded mean/std", file=sys.stderr)
        mean, std = (torch.tensor(known[k], dtype=torch.float32) for k in ("mean", "std"))
        return Data(splits, splits.train.images, mean, std, stream=files, folder=folder)
    if rank == 0:
        print(f"[data] streaming the {len(files)} training images ({files.decoded_bytes() / 2**30:.2f} GiB decoded) "
              f"from their folder; one pass first for their mean and std{' and fingerprint' if digest else ''}, "
              f"checking every file{f' (shared by {world} ranks)' if world > 1 else ''}", file=sys.stderr)
    sums, digests = PixelSums(3), Fingerprint(files.shape) if digest else None
    batches = [r.tolist() for r in torch.arange(len(files))[rank::world].split(64)]
    error = None
    try:
        for x, errors in tqdm(decoded(files, batches, d.loader_workers), unit="batch", total=len(batches),
                              desc="[data] mean/std", disable=not cfg.log.progress or rank != 0, file=sys.stderr):
            raise_first(errors)
            sums.add(x)
            if digests is not None:
                digests.add(x)
    except DataError as e:  # every rank must reach the sum below, or the others would wait for this one forever
        error = str(e)
    if world > 1:
        totals = sum_across_ranks([*sums.totals(), int(error is not None)])
        if totals[-1] and error is None:
            raise DataError(f"{totals[-1]} other rank(s) found training files they cannot read (each names its "
                            f"file in its own output)")
        sums.merge(totals[:-1])
    if error is not None:
        raise DataError(error)
    mean, std = sums.stats()
    return Data(splits, splits.train.images, mean, std.clamp_min(1e-3), stream=files, folder=folder,
                train_sha256=digests.hexdigest(files.labels) if digests is not None else None)


def build_loader(cfg: Config, data: Data, dist_info: DistInfo, device: torch.device):
    """The training batches: FFCV over a .beton where there is one (data.loader=auto|ffcv), torch batches decoded
    from the files of a streamed image folder (data.stream), else in-memory torch batches. Says which on stderr
    (primary rank)."""
    common = dict(shuffle=True, augment=cfg.data.augment, seed=cfg.train.seed, rank=dist_info.rank,
                  world_size=dist_info.world_size)
    if cfg.data.loader == "ffcv" and data.beton is None:
        raise ConfigError("data.loader='ffcv' needs a .beton: write one with `pst-dist write-beton` and set "
                          "data.source='beton', data.root=<that directory>")
    if data.beton is not None and cfg.data.loader != "torch":
        loader = data.beton.batches("train", cfg.train.batch_size, device=device,
                                    num_workers=cfg.data.loader_workers, **common)
        why = f"FFCV Loader over {data.beton.file('train')} ({data.beton.meta['write_mode']}, " \
              f"{cfg.data.loader_workers} workers)"
    elif data.stream is not None:
        loader = FolderBatches(data.stream, cfg.train.batch_size, workers=cfg.data.loader_workers,
                               drop_last=True, device=device, prefetch=cfg.data.prefetch, **common)
        why = (f"torch batches streamed from {cfg.data.root}/train ({cfg.data.loader_workers} DataLoader "
               f"workers decoding ahead), augmented on {device.type}")
        if device.type == "cpu":
            why += oversubscribed(torch.get_num_threads(), cfg.data.loader_workers, cpu_share())
    else:
        if data.beton is not None:
            tr = data.beton.read_split("train", num_workers=cfg.data.loader_workers)
            images, labels, why = tr.images, tr.labels, "torch in-memory batches over the decoded .beton"
        else:
            images, labels = data.poisoned_train, data.splits.train.labels
            why = "torch in-memory batches (the data is not a .beton)"
        on_device = keep_on_device(cfg.data.on_device, images, device)
        loader = TensorBatches(images, labels, cfg.train.batch_size, drop_last=True, device=device,
                               prefetch=cfg.data.prefetch, on_device=on_device, **common)
        why += f", augmented on {device.type}, " + (
            "the set held on the device" if on_device else
            f"{cfg.data.prefetch} batches prefetched by a thread" if cfg.data.prefetch else "no prefetch")
    if len(loader) == 0:
        n = len(data.beton if data.beton is not None else data.stream if data.stream is not None else
                data.splits.train)
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the {n // dist_info.world_size} "
                          f"training images each of the {dist_info.world_size} process(es) gets: no full batch to "
                          f"train on (the last partial batch is dropped); lower train.batch_size")
    if dist_info.is_primary:
        print(f"[data] {why}; rank 0 of {dist_info.world_size} gets {len(loader)} batches/epoch", file=sys.stderr)
    return loader


def cpu_share() -> int:
    """The cores this process may count on: its affinity mask (``taskset``, a cpuset; not a cgroup CPU quota), shared
    among the node's training processes (:func:`local_processes`) when the mask spans the whole machine (a launcher
    that binds each rank to cores of its own, ``srun --cpu-bind``, has divided them already)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_processes()) if cores == os.cpu_count() else cores


def oversubscribed(threads: int, workers: int, share: int) -> str:
    """A note for the loader's line when a streamed CPU run's torch threads and its decoding processes ask for more
    than the ``share`` of the cores this process has (:func:`cpu_share`): on 2 cores such a run's step took 2.4x as
    long (docs/results/gpu_throughput.md). Only a note: the thread count is the user's, and a run's figures depend
    on it. (Other processes on the node, a bench's pool or other Tune trials, are not counted.)"""
    if threads + workers <= share:
        return ""
    return (f"; its {threads} torch threads and {workers} decoding processes share {share} cores, which can slow "
            f"each step (2.4x on 2 cores): set train.threads={max(1, share - workers)} (or fewer "
            f"data.loader_workers)")


def keep_on_device(setting: bool | str, images: torch.Tensor, device: torch.device) -> bool:
    """``data.on_device``: never on the CPU; ``auto``: on a GPU when the images take under a quarter of its memory
    and under half of what is free now (other processes may share it: Ray trials or bench cells with a GPU
    fraction)."""
    if device.type != "cuda" or setting is False:
        return False
    if setting is True:
        return True
    free, total = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() < min(total / 4, free / 2)


def beton_data(cfg: Config):
    """``train.Data`` for data.source='beton': clean val/test in memory, the training split left on disk (its
    first images kept for the detectors' probe and the sample grid)."""
    if cfg.poison.kind != "none":
        raise DataError(f"data.source='beton' already holds its poison; set poison.kind='none' "
                        f"(found poison.kind={cfg.poison.kind!r})")
    b = beton.BetonDir(cfg.data.root, verify=cfg.data.verify)
    if b.meta["lossy"]:
        print(beton.JPEG_WARNING.format(q=b.meta["jpeg_quality"]), file=sys.stderr)
    workers = cfg.data.loader_workers
    head = b.read_split("train", limit=max(cfg.data.probe_size, 64), num_workers=workers)
    splits = Splits(head, b.read_split("val", num_workers=workers), b.read_split("test", num_workers=workers),
                    int(b.meta["num_classes"]), f"beton:{b.meta['source']}", len(b))
    return Data(splits, head.images, torch.tensor(b.meta["mean"]), torch.tensor(b.meta["std"]), beton=b)


def write_betons(cfg: Config, out: Path, *, overwrite: bool = False, write_mode: str = "raw", jpeg_quality: int = 90,
                 num_workers: int = 2, log=print) -> dict:
    """Build the configured data set and poison, write train/val/test .beton files and beton.json into ``out``.

    ``out`` is checked first (:func:`pst_dist.io.check_out_dir`): it must be new, empty, or an earlier write-beton
    output to be replaced with ``overwrite``; anything else (a data set's own directory, a user's files) is refused
    with OutputError and not touched. Atomic: everything goes to a hidden sibling ``.<name>.partial-<pid>`` directory
    that is renamed into place only when complete, so an interrupted or failed write (full disk) leaves nothing and
    an earlier output as it was.
    """
    if cfg.data.source == "beton":
        raise DataError("data.source='beton': the input is already a beton directory; pick the original source")
    if cfg.defense.kind != "none":  # beton.json records no defense, and a run on the beton refuses one: refused here
        raise ConfigError(f"defense.kind={cfg.defense.kind!r}: write-beton writes the data set and its poison as "
                          f"they are; train from the .beton with the defense there, or from the source")
    if write_mode not in ("raw", "jpg"):
        raise ConfigError(f"write mode {write_mode!r}: expected 'raw' or 'jpg'")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality {jpeg_quality!r}: expected an integer in [1, 100]")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"--workers {num_workers!r}: expected an integer >= 1")
    out = Path(out)
    replace = check_out_dir(out, command="write-beton", marker=beton.META, owned=beton.OWNED, overwrite=overwrite,
                            is_ours=beton.is_beton_dir)
    if write_mode == "jpg":
        log(beton.JPEG_WARNING.format(q=jpeg_quality))
    with contextlib.ExitStack() as stack:
        tmp = enter_out_dir(stack, out, replace, beton.OWNED)  # first: an unwritable --out fails before the work
        t0 = time.perf_counter()
        # validates every input before anything is written; a streamed folder is written as it is read, file by
        # file (the folder holds the data as trained on: nothing to poison, norms 0)
        data = build_data(cfg, digest=True)
        s = data.splits
        train = (data.stream, data.stream.labels) if data.stream is not None else (data.poisoned_train, s.train.labels)
        tensors = {"train": train, "val": (s.val.images, s.val.labels), "test": (s.test.images, s.test.labels)}
        files = {}
        for name, (x, y) in tensors.items():
            t = time.perf_counter()
            p = tmp / f"{name}.beton"
            try:
                beton.write_split(p, x, y, write_mode=write_mode, jpeg_quality=jpeg_quality, num_workers=num_workers)
            except OSError as e:
                raise write_failed(out, e) from e
            files[name] = {"file": p.name, "num_samples": len(y), "bytes": p.stat().st_size, "sha256": sha256(p)}
            log(f"wrote {name}.beton: {len(y)} images, {p.stat().st_size / 2**20:.1f} MiB, "
                f"{time.perf_counter() - t:.1f} s")
        meta = {
            "format": beton.FORMAT, "write_mode": write_mode,
            "jpeg_quality": jpeg_quality if write_mode == "jpg" else None,
            "lossy": write_mode == "jpg", "source": cfg.data.source, "shape": list(s.shape),
            "num_classes": s.num_classes, "splits": files,
            "poison": {**asdict(cfg.poison), "norms": norms(s.train.images, data.poisoned_train)},
            "fingerprint": {"clean_train_sha256": data.train_sha256 or fingerprint(s.train)},
            "mean": data.mean.tolist(), "std": data.std.tolist(),
            "data_config": asdict(cfg.data), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        try:
            (tmp / beton.META).write_text(json.dumps(meta, indent=2))
        except OSError as e:
            raise write_failed(out, e) from e
    return meta


def poison_meta(cfg: Config, clean: Split, poisoned: torch.Tensor, info: dict, seconds: float) -> dict:
    """poison.json for ``poisoned``, made from ``clean`` (in the source's order) with ``cfg.poison`` in ``seconds``:
    the attack, its parameters and seed, the clean images' fingerprint, the measured norms, what a model-based attack
    did (``info``: rounds, errors) and the machine's kernel choice, which its result depends on too; the [model] a
    model-based attack's surrogate is, the train.bf16 autocast it runs under and the data.augment poison.eot augments
    as (:func:`pst_dist.poison.store.fill` adds the shape and hashes)."""
    return {"format": store.FORMAT, "attack": cfg.poison.kind, "parameters": store.parameters(cfg.poison),
            "seed": cfg.poison.seed, "source": cfg.data.source,
            "fingerprint": {"clean_train_sha256": fingerprint(clean)}, "norms": norms(clean.images, poisoned),
            "seconds": round(seconds, 2), "model_based": info, "machine": machine_facts(build_device(cfg)),
            "model": asdict(cfg.model), "bf16": cfg.train.bf16, "augment": cfg.data.augment}


def write_poisoned(cfg: Config, out: Path, *, overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Poison every training image of ``cfg.data``'s source with ``cfg.poison`` and store it at ``out``; with
    poison.kind='file', import the poison poison.path names (checked against the clean images as training would).
    Every image is stored poisoned: poison.ratio applies when training reads the store.

    ``out`` is checked before anything is generated (:func:`pst_dist.io.check_out_dir`): it must be new, empty, or
    an earlier store to be replaced with ``overwrite``; OutputError otherwise, and nothing there is touched."""
    if cfg.poison.kind == "none":
        raise ConfigError("pst-dist poison: poison.kind='none' is not an attack to generate (or --import FILE)")
    if cfg.data.source == "beton":  # its images are stored poisoned, or clean beside no store: poison the source
        raise DataError(f"pst-dist poison: data.source='beton' (data.root={cfg.data.root!r}): a .beton directory "
                        f"holds the data as written; poison the source it was written from (its beton.json names "
                        f"it), then write-beton that with --poison.kind=file")
    if cfg.poison.kind == "file" and store.is_store(Path(cfg.poison.path)):  # its attack, parameters and budget
        # would be lost: a copy is recorded as attack 'file' under poison.eps, which an L2 or L0 store exceeds
        raise ConfigError(f"pst-dist poison: {cfg.poison.path} is already a pst-dist poison store; train on it as it "
                          f"is (--poison.kind=file --poison.path={cfg.poison.path})")
    out = Path(out)
    replace = check_out_dir(out, command="poison", marker=store.META, owned=store.OWNED, overwrite=overwrite,
                            is_ours=store.is_store)
    with contextlib.ExitStack() as stack:
        tmp = enter_out_dir(stack, out, replace, store.OWNED)  # first: an unwritable --out fails before hours of em
        data = copy.deepcopy(cfg.data)
        data.train_size = 0  # every image of the source's training split: the validation images carved from it too
        splits = load_splits(data)  # (as the recipe does: the synthetic source sizes its split by data.val_from)
        parts = [splits.train, splits.val] if data.val_from == "train" else [splits.train]
        tr = Split(*(torch.cat([getattr(s, k) for s in parts]) for k in ("images", "labels", "index")))
        order = torch.argsort(tr.index)  # back to the source's own order
        if len(order) != splits.source_train_size:
            raise ConfigError(f"pst-dist poison: expected all {splits.source_train_size} training images, got "
                              f"{len(order)}")
        clean = Split(tr.images[order], tr.labels[order], tr.index[order])
        t0 = time.time()
        poisoned, info = make_poison(clean.images, clean.labels, clean.index, splits.source_train_size, cfg.poison,
                                splits.num_classes, full=cfg)
        seconds = time.time() - t0
        what = f"imported {cfg.poison.path}" if cfg.poison.kind == "file" else cfg.poison.kind
        log(f"[poison] {what} on {len(clean)} images of {cfg.data.source}: {seconds:.1f} s")
        meta = poison_meta(cfg, clean, poisoned, info, seconds)
        try:
            store.fill(tmp, poisoned, meta)
        except OSError as e:
            raise write_failed(out, e) from e
    return meta

