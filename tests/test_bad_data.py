"""Bad data sets are refused by the real CLI: a one-line error naming the bad value and its file, a non-zero exit,
nothing written, nothing of the user's touched.

Every case writes its bad files itself, in the real on-disk format (CIFAR pickle batches in the CIFAR layout, IDX
files, PNG / TIFF files from PIL, folders), then runs ``pst-dist`` on them: the CLI's ``main`` in this process (its
parsing, checks, message and exit code; a subprocess costs ~4-5 s of Python and torch start-up per case), and for
the cases in ``SUBPROCESS`` the installed module in a subprocess as well, which must answer the same. Each case is
its own test.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pst_dist.config import DataConfig
from pst_dist.data.sources import DataError, channel_stats, decode_image, load_splits

from .conftest import TINY, assert_refused, place_marker, run_cli, run_cli_in_process

# ---------------------------------------------------------------------------------------------------------------
# writers of real files


def cifar_batch(n: int, seed: int, label_key: bytes = b"labels", classes: int = 10) -> dict:
    """One batch in the layout of the python CIFAR files: bytes keys, uint8 N x 3072 data, a list of int labels."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", label_key: [int(v) for v in rng.integers(0, classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def write_cifar(root: Path, source: str = "cifar10", n: int = 16) -> Path:
    """A complete, valid CIFAR-10 (5 train batches + test_batch) or CIFAR-100 (train + test) directory."""
    ten = source == "cifar10"
    d = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if ten else ["train", "test"]
    for i, name in enumerate(names):
        batch = cifar_batch(n if ten else 5 * n, i, b"labels" if ten else b"fine_labels", 10 if ten else 100)
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    return d


def nested_pickle(batch: dict, key: bytes, depth: int) -> bytes:
    """``batch`` pickled with ``batch[key]`` a list nested ``depth`` deep (written opcode by opcode: pickle.dumps
    itself would hit the recursion limit)."""
    placeholder = b"PLACEHOLDER-FOR-NESTED-LIST"
    raw = pickle.dumps({**batch, key: placeholder}, protocol=3)  # protocol 3: no frames, so lengths may change
    op = b"C" + bytes([len(placeholder)]) + placeholder  # SHORT_BINBYTES
    assert raw.count(op) == 1
    return raw.replace(op, b"]" * depth + b"a" * (depth - 1))  # EMPTY_LIST x depth, then APPEND each into the last


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def write_fmnist(root: Path, n_train: int = 80, n_test: int = 20, test_side: int = 28,
                 train_labels: np.ndarray | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10 if train_labels is None else train_labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, test_side, test_side)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


def write_imagefolder(root: Path, classes: tuple[str, ...] = ("n01", "n02"), n: int = 4, side: int = 20) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


def deep_image(path: Path, mode: str, side: int = 20) -> None:
    """A real image file of more than 8 bits a channel, in PIL ``mode``, with values PIL's 8-bit conversion clips."""
    ramp = np.linspace(0, 60000, side * side).reshape(side, side)
    if mode == "F":
        Image.fromarray(ramp.astype(np.float32) / 60000, "F").save(path)  # floats in [0, 1]
    elif mode == "I":
        Image.fromarray(ramp.astype(np.int32), "I").save(path)
    elif mode == "I;16B":
        Image.frombytes("I;16B", (side, side), ramp.astype(">u2").tobytes()).save(path)
    else:
        Image.fromarray(ramp.astype(np.uint16)).save(path)  # "I;16"
    with Image.open(path) as im:
        assert im.mode == mode, im.mode


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, row: bytes) -> None:
    """A PNG written chunk by chunk: every row the same, so a huge image stays a small file."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" + row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth,
                                                                        colour_type, 0, 0, 0))
                     + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------------
# the cases: each writes its files under tmp and says how to run the CLI and what the refusal must name


@dataclass
class Case:
    args: list[str]
    names: list[str]
    markers: list[Path]
    data: Path
    """The data set's directory: every file in it must be unchanged."""
    absent: list[Path] = field(default_factory=list)
    """Outputs that must not exist afterwards (the run directory, --out)."""


def train_case(tmp: Path, source: str, root: Path, names: list[str], *extra: str) -> Case:
    run_dir = tmp / "runs" / "r1"
    markers = [place_marker(tmp / "runs"), place_marker(root)]
    args = ["train", *TINY, f"--data.source={source}", f"--data.root={root}", f"--log.run_dir={run_dir}", *extra]
    return Case(args, names, markers, root, [run_dir])


def cifar_case(tmp: Path, file: str, batch: dict | bytes, names: list[str], source: str = "cifar10") -> Case:
    root = tmp / source
    d = write_cifar(root, source)
    (d / file).write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2))
    return train_case(tmp, source, root, [file, *names])


def case_cifar_data_str(tmp: Path) -> Case:
    return cifar_case(tmp, "data_batch_2", {**cifar_batch(16, 0), b"data": "not pixels"}, ["'data' is a str"])


def case_cifar_labels_dict(tmp: Path) -> Case:
    b = cifar_batch(16, 0)
    b[b"labels"][3] = {"cat": 3}
    return cifar_case(tmp, "data_batch_1", b, ["'labels' holds a dict at [3]"])


def case_cifar_labels_deeply_nested(tmp: Path) -> Case:
    raw = nested_pickle(cifar_batch(16, 0), b"labels", 200_000)
    return cifar_case(tmp, "test_batch", raw, ["'labels' is not an array of integers"])


def case_cifar_data_int16(tmp: Path) -> Case:
    b = cifar_batch(16, 0)
    data = b[b"data"].astype(np.int16)
    data[0, 0], data[5, 9] = 300, -1  # np.asarray(..., dtype=np.uint8) would make these 44 and 255
    return cifar_case(tmp, "data_batch_3", {**b, b"data": data}, ["'data' (int16) holds values -1..300"])


def case_cifar_labels_float(tmp: Path) -> Case:
    b = cifar_batch(16, 0)
    labels = np.asarray(b[b"labels"], dtype=np.float64)
    labels[2] = 2.7  # np.asarray(..., dtype=np.int64) would make it 2
    return cifar_case(tmp, "data_batch_1", {**b, b"labels": labels}, ["'labels' has dtype float64"])


def fast_cifar_data_bool(tmp: Path) -> Case:
    b = cifar_batch(16, 0)
    return cifar_case(tmp, "data_batch_4", {**b, b"data": b[b"data"] > 127}, ["'data' has dtype bool"])


def case_cifar_count_mismatch(tmp: Path) -> Case:
    b = cifar_batch(16, 0)
    b[b"labels"] = b[b"labels"][:15]
    return cifar_case(tmp, "data_batch_5", b, ["(16, 3072)", "(15,)"])


def case_cifar100_label_range(tmp: Path) -> Case:
    b = cifar_batch(80, 0, b"fine_labels", 100)
    b[b"fine_labels"][7] = 100
    return cifar_case(tmp, "test", b, ["'fine_labels' hold values", "..100", "expected 0..99"], source="cifar100")


def case_fmnist_label_range(tmp: Path) -> Case:
    labels = np.arange(80) % 10
    labels[11] = 12
    write_fmnist(tmp / "fm", train_labels=labels)
    return train_case(tmp, "fashion-mnist", tmp / "fm", ["train-labels-idx1-ubyte.gz", "labels contain 12"])


def fast_fmnist_count_mismatch(tmp: Path) -> Case:
    write_fmnist(tmp / "fm", train_labels=np.arange(79) % 10)
    return train_case(tmp, "fashion-mnist", tmp / "fm", ["(80, 28, 28)", "(79,)", "do not match"])


def case_fmnist_test_shape(tmp: Path) -> Case:
    write_fmnist(tmp / "fm", test_side=32)
    return train_case(tmp, "fashion-mnist", tmp / "fm", ["1x32x32", "1x28x28"])


def case_imagefolder_empty_class(tmp: Path) -> Case:
    """`pst-dist poison`: the --out it would have written must not appear."""
    root = tmp / "imgs"
    write_imagefolder(root, ("n01", "n02", "n03"))
    for p in (root / "train" / "n02").iterdir():
        p.unlink()
    (root / "train" / "n02" / "notes.txt").write_text("no images here\n")
    out = tmp / "outs" / "poisoned"
    markers = [place_marker(tmp / "outs"), place_marker(root)]
    args = ["poison", "--out", str(out), *TINY, "--data.source=imagefolder", f"--data.root={root}",
            "--data.val_size=1", "--poison.kind=classwise_noise"]
    return Case(args, [str(root / "train" / "n02"), "holds no images"], markers, root, [out])


def case_imagefolder_extra_val_class(tmp: Path) -> Case:
    root = tmp / "imgs"
    write_imagefolder(root)
    (root / "val" / "n09").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "val" / "n09" / "0.png")
    return train_case(tmp, "imagefolder", root, ["'n09'", "not in"], "--data.val_size=2")


def deep_image_case(tmp: Path, mode: str, suffix: str) -> Case:
    root = tmp / "imgs"
    write_imagefolder(root)
    bad = root / "train" / "n02" / f"deep{suffix}"
    deep_image(bad, mode)
    return train_case(tmp, "imagefolder", root, [str(bad), f"image mode {mode!r}"], "--data.val_size=2")


def case_imagefolder_16bit_png(tmp: Path) -> Case:
    return deep_image_case(tmp, "I;16", ".png")


def fast_imagefolder_float_tiff(tmp: Path) -> Case:
    return deep_image_case(tmp, "F", ".tif")


def case_imagefolder_decompression_bomb(tmp: Path) -> Case:
    """20000 x 20000 pixels (a 60 KB PNG): over twice PIL's limit; refused when opened, before any pixel is decoded."""
    root = tmp / "imgs"
    write_imagefolder(root)
    bomb = root / "val" / "n01" / "huge.png"
    write_png(bomb, 20_000, 20_000, 1, 0, bytes(2500))
    return train_case(tmp, "imagefolder", root, [str(bomb), "400000000 pixels"], "--data.val_size=2")


def case_poison_folder_16bit(tmp: Path) -> Case:
    """--poison.kind=file over a folder of PNGs (one per synthetic training image), one of them 16-bit."""
    folder = tmp / "poison_pngs"
    folder.mkdir()
    n = 256 + 64  # TINY: synthetic_train + val_size images in the source's training split
    for i in range(n):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / f"{i:05d}.png")
    first = load_splits(DataConfig(synthetic_train=256, val_size=64, img_size=16)).train.index[0]
    bad = folder / f"{int(first):05d}.png"  # the first training image read (val rows are not read)
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(bad)
    run_dir = tmp / "runs" / "r1"
    markers = [place_marker(tmp / "runs"), place_marker(folder)]
    args = ["train", *TINY, "--poison.kind=file", f"--poison.path={folder}", f"--log.run_dir={run_dir}"]
    return Case(args, [str(bad), "image mode 'I;16'"], markers, folder, [run_dir])


def case_write_beton_cifar_int64(tmp: Path) -> Case:
    """`pst-dist write-beton`: labels of another integer type out of range; --out must not appear."""
    root = tmp / "cifar10"
    d = write_cifar(root)
    b = cifar_batch(16, 0)
    labels = np.asarray(b[b"labels"], dtype=np.int64)
    labels[4] = -3
    (d / "data_batch_2").write_bytes(pickle.dumps({**b, b"labels": labels}, protocol=2))
    out = tmp / "betons" / "b"
    markers = [place_marker(tmp / "betons"), place_marker(root)]
    args = ["write-beton", "--out", str(out), *TINY, "--data.source=cifar10", f"--data.root={root}"]
    return Case(args, ["data_batch_2", "'labels' hold values -3..9"], markers, root, [out])


def case_fmnist_images_too_small(tmp: Path) -> Case:
    """IDX images of 3 x 300 pixels: below the 8-pixel side data.img_size has (the views' padding failed on them)."""
    fm = tmp / "fm"
    fm.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 80), ("t10k", 20)):
        write_idx(fm / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 3, 300)))
        write_idx(fm / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return train_case(tmp, "fashion-mnist", fm, ["1x3x300", "both sides must be >= 8"])


def case_cifar_root_mistyped(tmp: Path) -> Case:
    """A data.root that does not exist: refused as not found, nothing created there (no download into it)."""
    case = train_case(tmp, "cifar10", tmp / "cifar10_typo" / "sub", ["data.root=", "cifar10_typo/sub", "not found"])
    case.markers = case.markers[:1]  # train_case put a marker into the root: take it out again
    (tmp / "cifar10_typo" / "sub" / "USER_FILE.txt").unlink()
    for p in (tmp / "cifar10_typo" / "sub", tmp / "cifar10_typo"):
        p.rmdir()
    case.data, case.absent = tmp / "runs", [*case.absent, tmp / "cifar10_typo"]
    return case


CASES: dict[str, Callable[[Path], Case]] = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}
FAST: dict[str, Callable[[Path], Case]] = {
    name.removeprefix("fast_"): fn for name, fn in globals().items() if name.startswith("fast_")}
"""Cases of the same kind as one above, checked in-process (load_splits) to keep the file fast."""


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def refusals(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the selected cases, run their CLI commands in this process, one after another; case -> (CompletedProcess,
    Case, tmp, before)."""
    wanted = {item.callspec.params["case"] for item in request.session.items  # only the cases selected (-k)
              if getattr(item, "module", None) is request.module
              and getattr(item, "originalname", None) == "test_bad_data_refused"}
    built = {}
    for name in sorted(wanted):
        tmp = tmp_path_factory.mktemp(name)
        case = CASES[name](tmp)
        built[name] = (case, tmp, snapshot(case.data))
    return {name: (run_cli_in_process(*case.args), *built[name]) for name, (case, _, _) in built.items()}


SUBPROCESS = ("cifar_labels_deeply_nested", "write_beton_cifar_int64")
"""Cases also run through ``python -m pst_dist.cli`` (a train and a write-beton refusal): the same exit and message."""
assert set(SUBPROCESS) <= set(CASES), SUBPROCESS


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_refused(case: str, refusals: dict) -> None:
    out, c, tmp, before = refusals[case]
    if case in SUBPROCESS:
        run = run_cli(*c.args, timeout=300)
        said = [[line for line in r.stderr.splitlines() if line.startswith("pst-dist:")] for r in (run, out)]
        assert run.returncode == out.returncode and said[0] == said[1], (run.stderr[-2000:], out.stderr[-2000:])
    assert_refused(out, names=c.names, markers=c.markers, root=tmp, code=2)
    errors = [line for line in out.stderr.splitlines() if line.startswith("pst-dist: error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in c.names), out.stderr[-2000:]  # one line says it all
    for p in c.absent:
        assert not p.exists(), f"{p} was created"
    assert snapshot(c.data) == before, "the data set's files were changed"


# ---------------------------------------------------------------------------------------------------------------
# fast checks of the functions themselves


@pytest.mark.parametrize("case", sorted(FAST))
def test_bad_data_refused_in_process(tmp_path: Path, case: str) -> None:
    c = FAST[case](tmp_path)
    over = dict(a.removeprefix("--data.").split("=", 1) for a in c.args if a.startswith("--data."))
    cfg = DataConfig(source=over["source"], root=over["root"], val_size=2)
    with pytest.raises(DataError) as e:
        load_splits(cfg)
    assert all(n in str(e.value) for n in c.names) and "\n" not in str(e.value), str(e.value)


def test_channel_stats_exact_and_refuses_constant_channel() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 9, 7), generator=g, dtype=torch.uint8)
    mean, std = channel_stats(x)
    f = x.double() / 255
    assert torch.allclose(mean.double(), f.mean(dim=(0, 2, 3)), atol=1e-7)
    assert torch.allclose(std.double(), f.std(dim=(0, 2, 3)), atol=1e-7)
    x[:, 1] = 77  # e.g. a folder of images blank in green
    with pytest.raises(DataError, match=r"channel 1 has std 0 \(every pixel 77/255"):
        channel_stats(x)


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_decode_refuses_deep_modes(tmp_path: Path, mode: str) -> None:
    p = tmp_path / "deep.tif"
    deep_image(p, mode)
    with pytest.raises(DataError, match=f"deep.tif: image mode '{mode}'"):
        decode_image(p)


def test_decode_refuses_16bit_rgb_png(tmp_path: Path) -> None:
    """PIL opens a 16-bit RGB PNG as mode RGB, keeping each value's high byte: refused, not truncated silently."""
    p = tmp_path / "rgb48.png"
    write_png(p, 4, 4, 16, 2, bytes(range(24)))
    with pytest.raises(DataError, match=r"rgb48.png: image stored with 16 bits a channel .*'RGB;16B'"):
        decode_image(p)


def test_decode_converts_8bit_modes_exactly(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    alpha = np.full((6, 5, 1), 3, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "rgba.png")), rgb)  # alpha discarded, colour kept
    Image.fromarray(np.dstack([rgb[:, :, 0], alpha[:, :, 0]]), "LA").save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "la.png")), rgb[:, :, 0])
    pal = Image.fromarray(rgb[:, :, 0] % 4, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 9, 9, 9])
    pal.save(tmp_path / "p.png", transparency=0)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [9, 9, 9]], np.uint8)
    assert np.array_equal(np.asarray(decode_image(tmp_path / "p.png")), palette[rgb[:, :, 0] % 4])
    Image.fromarray(rgb[:, :, 0] > 100).save(tmp_path / "bits.png")
    assert np.array_equal(np.asarray(decode_image(tmp_path / "bits.png")), (rgb[:, :, 0] > 100) * np.uint8(255))


def test_decode_refuses_images_over_the_pil_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 pixels: PIL only warns, below twice the limit
    with pytest.raises(DataError, match=r"a.png: image too large to decode \(Image size \(1200 pixels\)"):
        decode_image(tmp_path / "a.png")


def test_imagefolder_refuses_elongated_image(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    Image.fromarray(np.zeros((1, 400_000), np.uint8)).save(tmp_path / "train" / "n01" / "strip.png")
    with pytest.raises(DataError, match=r"strip.png: image size 400000x1: too elongated"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path), img_size=24, val_size=2))


def test_cifar_other_integer_types_in_range_are_accepted(tmp_path: Path) -> None:
    d = write_cifar(tmp_path)
    b = cifar_batch(16, 0)
    (d / "data_batch_1").write_bytes(pickle.dumps({**b, b"data": b[b"data"].astype(np.int64),
                                                   b"labels": np.asarray(b[b"labels"], np.uint8)}, protocol=2))
    s = load_splits(DataConfig(source="cifar10", root=str(tmp_path), val_size=10, val_from="test"))
    i = int((s.train.index == 0).nonzero())  # row 0 of data_batch_1
    assert torch.equal(s.train.images[i].flatten(), torch.from_numpy(b[b"data"][0]))


def test_cifar_odd_keys_and_list_items_named(tmp_path: Path) -> None:
    """A deeply nested tuple as a key (its repr would hit the recursion limit) and strings among the labels."""
    d = write_cifar(tmp_path)
    deep_key = b")" + b"\x85" * 100_000  # EMPTY_TUPLE, then TUPLE1 around it 100000 times
    (d / "data_batch_1").write_bytes(b"\x80\x02}" + deep_key + b"K\x01s.")
    with pytest.raises(DataError, match=r"data_batch_1: CIFAR batch lacks 'data' or 'labels' \(keys: tuple\)"):
        load_splits(DataConfig(source="cifar10", root=str(tmp_path), val_size=10))
    b = cifar_batch(16, 0)
    b[b"labels"][5] = "cat"
    (d / "data_batch_1").write_bytes(pickle.dumps(b, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: 'labels' holds a str 'cat' at \[5\]"):
        load_splits(DataConfig(source="cifar10", root=str(tmp_path), val_size=10))


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # torch.load's, of the sparse file
def test_odd_poison_files_are_refused_naming_them(tmp_path: Path) -> None:
    """Imported poisons of a kind the checks did not expect: sparse or float8 tensors (weights_only loads them; the
    NaN check could not run on them), APBench labels that are not numbers, file and folder names of non-ASCII
    digits ('²': str.isdigit accepts it, int() does not)."""
    from pst_dist.poison import PoisonFileError
    from pst_dist.poison.folder import index_files
    from pst_dist.poison.imported import APBENCH_DATA, APBENCH_LABELS, read_apbench_numpy, read_tensor

    for name, t, want in (("sparse.pt", torch.zeros(4, 3, 8, 8).to_sparse(), "a torch.sparse_coo tensor of"),
                          ("f8.pt", torch.zeros(4, 3, 8, 8).to(torch.float8_e4m3fn), "a torch.float8_e4m3fn"),
                          ("meta.pt", torch.empty(4, 3, 8, 8, device="meta"), r"a meta-device tensor \(no values\)")):
        torch.save(t, tmp_path / name)
        with pytest.raises(PoisonFileError, match=f"{name}: {want}.*expected a dense tensor of uint8 images"):
            read_tensor(tmp_path / name)
    images, labels, index = torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4), torch.arange(4)
    np.save(tmp_path / APBENCH_DATA, np.zeros((4, 8, 8, 3), np.uint8))
    for bad in (np.array(list("abcd")), np.zeros(4, "datetime64[s]"), np.zeros(4, [("a", "<i4")])):
        np.save(tmp_path / APBENCH_LABELS, bad)
        with pytest.raises(PoisonFileError, match=f"{APBENCH_LABELS}: .* expected numeric class indices"):
            read_apbench_numpy(tmp_path, images, labels, index, 4)
    for rel in ("\u00b2.png", "\u00b3/1.png"):
        folder = tmp_path / f"pngs{len(rel)}"
        (folder / rel).parent.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / rel)
        with pytest.raises(PoisonFileError, match="expected the (image's row|numeric label)"):
            index_files(folder, 4)


def test_val_size_zero_refused() -> None:
    with pytest.raises(DataError, match="data.val_size=0 leaves no validation images"):
        load_splits(DataConfig(synthetic_train=100, val_size=0))

