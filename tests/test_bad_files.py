"""Bad inputs to `pst-dist poison`, `write-beton` and training, through the real CLI: each test makes its bad input
itself, then checks that the command is refused with a one-line error naming the bad value, that a file of the
user's placed beside (or inside) the output survives, and that nothing partial is left (conftest.assert_refused).
Commands that write run in a subprocess (`python -m pst_dist.cli`), as do a poison and a training refusal; the other
refusals stop before any work and run ``pst_dist.cli.main`` in this process (conftest.run_cli_in_process: the same
parsing, checks, message and exit code without a Python and torch start-up each; tests/test_bad_data.py checks that
both ways answer the same).

Real files throughout: .beton directories from `pst-dist write-beton` and poison stores from `pst-dist poison` on the
tiny synthetic data set, made once per module and copied per test."""

import copy
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pst_dist.io import OutputError, atomic_dir, sha256

from .conftest import MARKER_TEXT, TINY, assert_refused, partial_files, place_marker, run_cli, run_cli_in_process

ATTACK = "--poison.kind=classwise_noise"  # L-inf 8/255, the default poison.eps
TRAIN_1 = [*TINY, "--train.epochs=1"]
# a store holds every image of the source's training split; the synthetic source sizes that split by val_from, so
# the store's maker and its reader both take the validation images from the test split
STORE_DATA = [*TINY, "--data.val_from=test"]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative name -> bytes): 'unchanged byte for byte' is equality of two trees."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def beton_src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("beton") / "b"
    run = run_cli("write-beton", "--out", out, *TINY, ATTACK, "--workers=1")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def store_src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "p"
    run = run_cli("poison", "--out", out, *STORE_DATA, ATTACK)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def train_on_beton(root: Path, tmp_path: Path, *extra: str, run=run_cli_in_process):
    return run("train", *TRAIN_1, "--data.source=beton", f"--data.root={root}", f"--log.run_dir={tmp_path / 'run'}",
               *extra)


def train_on_store(store: Path, tmp_path: Path, *extra: str):
    return run_cli_in_process("train", *TRAIN_1, "--data.val_from=test", "--poison.kind=file",
                              f"--poison.path={store}", f"--log.run_dir={tmp_path / 'run'}", *extra)


def clean_source_order() -> np.ndarray:
    """The clean training images of TINY's source in its own order: what a poison store perturbs, row for row."""
    import torch

    from pst_dist.config import load_config
    from pst_dist.data.sources import load_splits

    data = copy.deepcopy(load_config(None, list(STORE_DATA)).data)
    data.val_from, data.train_size = "test", 0  # as `pst-dist poison` loads it: every training image
    tr = load_splits(data).train
    return tr.images[torch.argsort(tr.index)].numpy()


def rewrite_store(store: Path, arr: np.ndarray, clean: np.ndarray | None = None) -> None:
    """Replace a store's array and rewrite its metadata to match (hash; norms when ``clean`` is given), as someone
    covering their tracks would."""
    import torch

    from pst_dist.poison import norms

    np.save(store / "train_images.npy", arr)
    meta = json.loads((store / "poison.json").read_text())
    meta["train_images_sha256"] = sha256(store / "train_images.npy")
    if clean is not None:
        meta["norms"] = norms(torch.from_numpy(clean), torch.from_numpy(arr))
    (store / "poison.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------------------------
# output locations: nothing the user had is deleted or changed


def test_poison_refuses_a_foreign_non_empty_out(tmp_path):
    out = tmp_path / "mine"
    marker = place_marker(out)
    (out / "sub").mkdir()
    (out / "sub" / "notes.txt").write_text("keep")
    run = run_cli("poison", "--out", out, *STORE_DATA, ATTACK)
    assert_refused(run, names=[str(out), "USER_FILE.txt"], markers=[marker], root=tmp_path, code=2)
    assert (out / "sub" / "notes.txt").read_text() == "keep"


def test_write_beton_refuses_the_data_root_as_out(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for k in range(2):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * k + i, np.uint8)).save(root / f"class{k}" / f"{i}.png")
    marker = place_marker(root)
    before = tree(root)
    run = run_cli_in_process("write-beton", "--out", root, *TINY, "--data.source=imagefolder", f"--data.root={root}")
    assert_refused(run, names=[str(root)], markers=[marker], root=tmp_path, code=2)
    assert tree(root) == before, "the data set was changed"


@pytest.mark.parametrize("bad,names", [
    (["--defense.kind=jpeg"], ["defense.kind='jpeg'", "write-beton"]),  # beton.json would not record it
    (["--mode=jpg", "--jpeg-quality=500"], ["--jpeg-quality 500", "[1, 100]"]),  # the beton would not open
    (["--mode=jpg", "--jpeg-quality=0"], ["--jpeg-quality 0"]),
    (["--workers=0"], ["--workers 0"]),
])
def test_write_beton_refuses_what_it_could_not_write_or_record_before_any_work(tmp_path, bad, names):
    out = tmp_path / "b"
    marker = place_marker(tmp_path)
    run = run_cli_in_process("write-beton", "--out", out, *TINY, *bad)
    assert_refused(run, names=names, markers=[marker], root=tmp_path, code=2)
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["poison", "write-beton"])
def test_a_run_refused_after_it_made_its_out_s_parents_leaves_no_folders(tmp_path, cmd):
    """The folders made for --out's parent are removed again (only if still empty) when the work is refused."""
    out = tmp_path / "new" / "deeper" / "store"
    (tmp_path / "mine").mkdir()
    run = run_cli_in_process(cmd, "--out", out, *TINY, "--data.source=fashion-mnist",
                             f"--data.root={tmp_path / 'nowhere'}", *([ATTACK] if cmd == "poison" else []))
    assert_refused(run, names=[f"Fashion-MNIST directory not found: {tmp_path / 'nowhere'}"], root=tmp_path, code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_poison_of_a_beton_source_is_refused_naming_what_to_poison(tmp_path):
    run = run_cli_in_process("poison", "--out", tmp_path / "p", *TINY, ATTACK, "--data.source=beton",
                             f"--data.root={tmp_path / 'b'}")
    assert_refused(run, names=["data.source='beton'", f"data.root={str(tmp_path / 'b')!r}", "poison the source"],
                   root=tmp_path, code=2)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out", [".", "..", "./", "nope/..", "nope/../.."])
def test_the_current_directory_as_out_is_refused_before_any_work(tmp_path, monkeypatch, out):
    """``--out .`` (an empty current directory) was accepted, the poison made, then refused as 'appeared while
    writing' (its partial folder was made inside it); renamed into place it would pull the shell's directory away."""
    here = tmp_path / "a" / "empty"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK)
    assert_refused(run, names=[f"--out {Path(out)}", "current directory"], root=tmp_path, code=2)
    assert list(here.iterdir()) == [] and sorted(p.name for p in tmp_path.rglob("*")) == ["a", "empty"]


def test_resume_refuses_a_poison_store_written_again_between_segments(tmp_path, store_src):
    """A store replaced by `pst-dist poison --overwrite` (another seed) passes its own checks; the run's resume
    would train on another poison under the same config: refused, naming poison.path. The same store resumes."""
    import json

    store = copy_dir(store_src, tmp_path / "p")
    first = train_on_store(store, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert len(json.loads((run_dir / "meta.json").read_text())["inputs"]["poison_sha256"]) == 64
    again = run_cli_in_process("poison", "--out", store, *STORE_DATA, ATTACK, "--poison.seed=1", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    before = tree(run_dir)
    out = train_on_store(store, tmp_path, "--resume", "--train.epochs=2")
    assert_refused(out, names=[f"the poison read from {store} is not the one the run in", "--overwrite"],
                   root=tmp_path, code=2)
    assert tree(run_dir) == before
    shutil.rmtree(store)
    copy_dir(store_src, store)  # the poison the run started on, back
    out = train_on_store(store, tmp_path, "--resume", "--train.epochs=2")
    assert out.returncode == 0, out.stderr[-3000:]


def test_earlier_output_is_kept_without_overwrite(tmp_path, store_src):
    out = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(tmp_path)
    before = tree(out)
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK, "--poison.seed=1")
    assert_refused(run, names=[str(out), "--overwrite"], markers=[marker], root=tmp_path, code=2)
    assert tree(out) == before


def test_earlier_output_is_replaced_with_overwrite(tmp_path, store_src):
    out = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(tmp_path)
    before = tree(out)
    run = run_cli("poison", "--out", out, *STORE_DATA, ATTACK, "--poison.seed=1", "--overwrite")
    assert run.returncode == 0, run.stderr[-3000:]
    after = tree(out)
    assert sorted(after) == ["poison.json", "train_images.npy"]
    assert after["train_images.npy"] != before["train_images.npy"], "not replaced"
    assert json.loads(after["poison.json"])["seed"] == 1
    assert marker.read_text() == MARKER_TEXT and not partial_files(tmp_path)


def test_overwrite_refuses_an_earlier_output_holding_a_foreign_file(tmp_path, store_src):
    out = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(out)  # the user's file inside the earlier output: --overwrite would lose it
    before = tree(out)
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK, "--overwrite")
    assert_refused(run, names=[str(out), "USER_FILE.txt"], markers=[marker], root=tmp_path, code=2)
    assert tree(out) == before


def test_a_file_put_into_the_earlier_output_while_writing_stops_the_replacement(tmp_path):
    """--overwrite was checked before the work; a user's file that appears in --out during it is not the earlier
    output's, so nothing is replaced: the earlier output and the file stay, the new output goes, no partial files."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.npy").write_text("earlier")
    with pytest.raises(OutputError, match=r"\[.USER_FILE.txt.\] appeared in it while writing"):
        with atomic_dir(out, replace=True, owned=("a.npy", "b.json")) as tmp:
            (tmp / "a.npy").write_text("new")
            place_marker(out)
    assert (out / "a.npy").read_text() == "earlier" and (out / "USER_FILE.txt").read_text() == MARKER_TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not partial_files(tmp_path)
    with atomic_dir(out, replace=True, owned=("a.npy", "b.json", "USER_FILE.txt")) as tmp:  # all its own: replaced
        (tmp / "b.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["b.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("links", [True, False])
def test_a_file_that_appears_where_a_new_file_is_written_is_left_as_it_is(tmp_path, monkeypatch, links):
    """save_atomic(new=True): the name was free when the command checked it; a user's file put there meanwhile is
    not replaced (a hard link refuses an existing name; without hard links, a check just before the rename)."""
    from pst_dist.io import save_atomic

    if not links:
        def no_link(*_a):
            raise OSError(errno.EPERM, "hard links not supported")

        monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "plot.png"

    def meanwhile(tmp: Path) -> None:
        tmp.write_text("ours")
        out.write_text("theirs")

    with pytest.raises(OutputError, match=f"{out}: appeared while pst-dist was writing it"):
        save_atomic(out, meanwhile, new=True)
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    out.unlink()
    save_atomic(out, lambda tmp: tmp.write_text("ours"), new=True)  # free: written
    assert out.read_text() == "ours" and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_ctrl_c_between_the_renames_of_a_replacement_leaves_one_output_in_place(tmp_path, monkeypatch):
    """The earlier output is renamed aside, then the new one into place: a Ctrl-C between the two (injected here at
    the first rename) waits for the second, so --out is never missing, nor the earlier output left hidden."""
    import os
    import signal

    from pst_dist import io as pio

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.npy").write_text("earlier")
    replace = os.replace
    calls = []

    def interrupted(src, dst):
        replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Python runs its handler at the next bytecode: here

    monkeypatch.setattr(pio.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, replace=True, owned=("a.npy",)) as tmp:
            (tmp / "a.npy").write_text("new")
    assert len(calls) == 2, "interrupted between the renames"
    assert (out / "a.npy").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_earlier_output_a_killed_replacement_moved_aside_is_removed_or_named_never_lost(tmp_path, store_src):
    """A replacement killed (SIGKILL) after it moved the earlier output aside leaves ``.X.old-<host>-<pid>/``: the
    next write to X removes it once the new output is in X's place; with X absent it is the only copy, so the
    command is refused naming it and how to put it back. Another machine's, or a live process's, stays; another
    machine's, or one named by an older pst-dist (``.X.old-<pid>``), is named on stderr (was: reported nowhere) and
    refused like this machine's while X is absent."""
    from pst_dist.io import _machine

    from .conftest import dead_pid

    host, dead = _machine(), dead_pid()
    out = copy_dir(store_src, tmp_path / "p")
    stale, kept, older, users = (tmp_path / f".p.old-{w}" for w in (f"{host}-{dead}", f"elsewhere+1-{dead}", dead,
                                                                      "backup"))
    for d in (stale, kept, older, users):
        copy_dir(store_src, d)
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK, "--poison.seed=1", "--overwrite")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"removed {stale.name} from {tmp_path}: left by a write that was killed" in run.stderr
    assert f"left {older.name}, {kept.name} in {tmp_path}: written on another machine, or named by an older " \
           f"pst-dist" in run.stderr, run.stderr[-3000:]
    assert not stale.exists() and tree(kept) == tree(store_src) == tree(older) == tree(users)
    assert users.name not in run.stderr  # a user's own name: not one pst-dist gives its temporaries
    shutil.rmtree(kept)
    shutil.rmtree(out)
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK)
    assert_refused(run, names=[f"--out {out}: absent, but {older} holds the earlier output"], code=2)
    shutil.rmtree(older)
    hidden = copy_dir(store_src, tmp_path / f".p.old-{host}-{dead}")  # killed between the two renames: X is absent
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK)
    assert_refused(run, names=[f"--out {out}: absent, but {hidden} holds the earlier output", f"mv {hidden} {out}"],
                   code=2)
    assert tree(hidden) == tree(store_src) and not out.exists()
    out.mkdir()  # made again empty (a job script's mkdir -p): still the only copy, still refused
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK, "--poison.seed=1", "--overwrite")
    assert_refused(run, names=[f"--out {out}: empty, but {hidden} holds the earlier output",
                               f"rmdir {out} && mv {hidden} {out}"], code=2)
    assert tree(hidden) == tree(store_src) and list(out.iterdir()) == []


def test_signals_deferred_delivers_each_signal_once_left_to_the_handler_it_had():
    import os
    import signal
    import time

    from pst_dist.io import signals_deferred

    seen = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append("SIGTERM"))
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                assert seen == [], "a signal was handled inside"
        assert seen == ["SIGTERM"], "the SIGTERM before the Ctrl-C was lost"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)


def test_out_that_is_a_file(tmp_path):
    out = tmp_path / "result"
    out.write_text(MARKER_TEXT)  # the user's file at the very path asked for
    run = run_cli_in_process("write-beton", "--out", out, *TINY, ATTACK)
    assert_refused(run, names=[str(out), "not a directory"], markers=[out], root=tmp_path, code=2)


def test_out_under_a_file(tmp_path):
    marker = place_marker(tmp_path)
    out = marker / "p"  # its parent is a regular file: it cannot be created (as root, a read-only parent could)
    run = run_cli_in_process("poison", "--out", out, *STORE_DATA, ATTACK)
    assert_refused(run, names=[str(out), str(marker)], markers=[marker], root=tmp_path, code=2)
    assert "[poison]" not in run.stderr, "the poison was generated before the unusable --out was noticed"


def test_full_disk_keeps_the_earlier_output(tmp_path, store_src):
    """A file size limit mid-write (RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk): the earlier output is
    as it was and no partial directory is left. (write-beton's FFCV writer processes under the same limit:
    test_beton.test_full_disk_stops_the_ffcv_writer.)"""
    out = copy_dir(store_src, tmp_path / "out")
    marker = place_marker(tmp_path)
    before = tree(out)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the array needs 197 kB

    run = subprocess.run([sys.executable, "-m", "pst_dist.cli", "poison", "--out", str(out), *STORE_DATA, ATTACK,
                          "--poison.seed=1", "--overwrite"], capture_output=True, text=True, timeout=180,
                         preexec_fn=limit_file_size)
    assert_refused(run, names=[str(out), "writing it failed", "file size limit"], markers=[marker], root=tmp_path)
    assert tree(out) == before


# ---------------------------------------------------------------------------------------------------------------
# stored inputs changed after they were written


def flip_pixel_bytes(beton: Path, n: int = 64) -> None:
    """Invert ``n`` bytes of the first training image's raw pixels inside ``beton`` (found by their content, which
    needs no ffcv import in this process): same size, same structure, another image."""
    from pst_dist.config import load_config
    from pst_dist.data.sources import load_splits
    from pst_dist.poison import apply_poison

    cfg = load_config(None, [*TINY, ATTACK])
    splits = load_splits(cfg.data)
    first = apply_poison(splits.train.images, splits.train.labels, cfg.poison, splits.num_classes)[0]
    pixels = first.permute(1, 2, 0).contiguous().numpy().tobytes()  # raw mode stores H x W x 3 uint8
    data = bytearray(beton.read_bytes())
    at = data.find(pixels)
    assert at > 0 and data.find(pixels, at + 1) < 0, "the first image's pixels not found once in the .beton"
    data[at: at + n] = bytes(b ^ 0xFF for b in data[at: at + n])
    beton.write_bytes(bytes(data))


def test_beton_with_flipped_pixel_bytes(tmp_path, beton_src):
    root = copy_dir(beton_src, tmp_path / "b")
    marker = place_marker(tmp_path)
    flip_pixel_bytes(root / "train.beton")
    run = train_on_beton(root, tmp_path, run=run_cli)  # a training refusal through the installed module
    assert_refused(run, names=["train.beton", "changed since it was written", "--data.verify=false"],
                   markers=[marker], root=tmp_path, code=2)


def test_beton_with_a_changed_label(tmp_path, beton_src):
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    root = copy_dir(beton_src, tmp_path / "b")
    marker = place_marker(tmp_path)
    r = Reader(str(root / "train.beton"))
    # sample 0's label: in the per-sample table that follows the header and the field descriptors
    at = HeaderType.itemsize + r.field_descriptors.nbytes + r.metadata.dtype.fields["f1"][1]
    size = (root / "train.beton").stat().st_size
    with open(root / "train.beton", "r+b") as f:
        f.seek(at)
        f.write(np.int64((int(r.metadata["f1"][0]) + 1) % 10).tobytes())  # sample 0 now claims another class
    assert (root / "train.beton").stat().st_size == size
    assert int(Reader(str(root / "train.beton")).metadata["f1"][0]) != int(r.metadata["f1"][0])
    run = train_on_beton(root, tmp_path)
    assert_refused(run, names=["train.beton", "changed since it was written"], markers=[marker], root=tmp_path,
                   code=2)


@pytest.mark.parametrize("key,value,names", [("num_classes", 2, ["train.beton: labels span 0..", "2 classes"]),
                                              ("shape", [3, 24, 24], ["train.beton: sample 0 is ", "says 24 x 24"])])
def test_beton_whose_samples_differ_from_its_json(tmp_path, beton_src, key, value, names):
    """beton.json's class count and image size checked against every sample's own metadata in the files (which its
    hashes do not cover): labels past the classes failed in cross-entropy mid-run, other sizes in FFCV's decoder."""
    root = copy_dir(beton_src, tmp_path / "b")
    meta = json.loads((root / "beton.json").read_text())
    meta[key] = value
    (root / "beton.json").write_text(json.dumps(meta))
    assert_refused(train_on_beton(root, tmp_path), names=names, root=tmp_path, code=2)
    assert not (tmp_path / "run").exists()


def test_broken_beton_json(tmp_path, beton_src):
    root = copy_dir(beton_src, tmp_path / "b")
    marker = place_marker(tmp_path)
    text = (root / "beton.json").read_text()
    (root / "beton.json").write_text(text[: len(text) // 2])  # cut off mid-write by something else
    run = train_on_beton(root, tmp_path)
    assert_refused(run, names=[str(root / "beton.json"), "not valid JSON"], markers=[marker], root=tmp_path, code=2)


def test_data_verify_false_skips_the_hash_check(tmp_path, store_src):
    """--data.verify=false, the documented way past the hash check (it costs one read of every stored byte): the
    store is opened without it, and the checks after it still refuse the changed array, for their own reason. (The
    same flag on a .beton directory: test_beton.test_verify_false_skips_only_the_hash.)"""
    store = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(tmp_path)
    clean = clean_source_order()
    np.save(store / "train_images.npy", np.where(clean < 128, 255, 0).astype(np.uint8))  # poison.json untouched
    run = train_on_store(store, tmp_path, "--data.verify=false")
    assert_refused(run, names=[str(store), "does not fit this data set"], markers=[marker], root=tmp_path, code=2)
    assert "changed since it was written" not in run.stderr


def test_store_with_a_255_perturbation_and_matching_metadata(tmp_path, store_src):
    store = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(tmp_path)
    clean = clean_source_order()
    rewrite_store(store, np.where(clean < 128, 255, 0).astype(np.uint8), clean)  # norms and hash agree with it
    run = train_on_store(store, tmp_path, "--poison.eps=1")  # a config that would accept anything
    assert_refused(run, names=[str(store), "L-inf", "parameters.eps = 8/255"], markers=[marker], root=tmp_path,
                   code=2)


def test_store_within_its_attack_but_above_the_configured_eps(tmp_path, store_src):
    store = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(tmp_path)
    run = train_on_store(store, tmp_path, "--poison.eps=0.01")  # 2/255 in whole levels < the stored 8/255
    assert_refused(run, names=[str(store), "8/255", "above poison.eps=0.01 (2/255 in whole pixel levels"],
                   markers=[marker], root=tmp_path, code=2)


def test_store_with_a_float32_array(tmp_path, store_src):
    store = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(tmp_path)
    arr = np.load(store / "train_images.npy")
    rewrite_store(store, arr.astype(np.float32) + 0.4)  # 0.4-255.4: would be trained unscaled
    run = train_on_store(store, tmp_path)
    assert_refused(run, names=["train_images.npy", "float32", "uint8"], markers=[marker], root=tmp_path, code=2)


def test_broken_poison_json(tmp_path, store_src):
    store = copy_dir(store_src, tmp_path / "p")
    marker = place_marker(tmp_path)
    meta = json.loads((store / "poison.json").read_text())
    del meta["norms"]
    meta["shape"] = "256x3x16x16"  # (every other broken key and value: test_poison.test_stored_poison_metadata_errors)
    (store / "poison.json").write_text(json.dumps(meta))
    run = train_on_store(store, tmp_path)
    assert_refused(run, names=[str(store / "poison.json"), "'shape'", "256x3x16x16"], markers=[marker],
                   root=tmp_path, code=2)


def test_a_store_without_its_poison_json_is_named_as_one(tmp_path, store_src):
    """Was: taken for a folder of image files ("no image files found")."""
    store = copy_dir(store_src, tmp_path / "p")
    (store / "poison.json").unlink()
    run = train_on_store(store, tmp_path)
    assert_refused(run, names=[f"{store}: holds train_images.npy but no poison.json"], root=tmp_path, code=2)


def test_atomic_dir_survives_a_parallel_job_removing_the_shared_parent_between_its_mkdirs(tmp_path, monkeypatch):
    # Parallel bench poison jobs share <bench.out>/poisons/; one that fails removes the parents it made if they are
    # empty, which can fall between another job's mkdir of that parent and of its temporary folder.
    import pathlib

    parent = tmp_path / "poisons"
    mkdir = pathlib.Path.mkdir
    removed = []

    def racing_mkdir(self, *args, **kwargs):
        if self.name.startswith(".out.partial-") and not removed:
            parent.rmdir()  # the other job's clean-up, just before ours
            removed.append(True)
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", racing_mkdir)
    with atomic_dir(parent / "out") as tmp:
        (tmp / "a.npy").write_text("x")
    assert removed and (parent / "out" / "a.npy").read_text() == "x"


def test_a_published_file_or_output_is_on_disk_before_its_name(tmp_path, monkeypatch):
    """Power loss after a rename can publish an empty file where the data never reached the disk: each atomic
    write fsyncs the temporary (every file of an output directory) before the rename, and the directory after."""
    from pst_dist import io

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    io.write_atomic(tmp_path / "a.json", "{}")
    tmp = next(p for kind, p in events if kind == "fsync")
    assert events == [("fsync", tmp), ("rename", str(tmp_path / "a.json")), ("fsync", str(tmp_path))], events
    assert Path(tmp).name.startswith(".a.json.tmp-")
    events.clear()
    with io.atomic_dir(tmp_path / "out") as d:
        (d / "sub").mkdir()
        (d / "sub" / "x.npy").write_bytes(b"1")
    synced = [p for kind, p in events if kind == "fsync"]
    assert [k for k, _ in events] == ["fsync", "fsync", "rename", "fsync"], events
    assert synced[0].endswith("/sub/x.npy") and events[-1] == ("fsync", str(tmp_path))
