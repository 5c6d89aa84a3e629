import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from pst_dist.config import DataConfig
from pst_dist.data.loaders import TensorBatches
from pst_dist.data.sources import DataError, load_splits, synthetic_images


def write_idx(path, arr, gz=True):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_fmnist(root, n_train=60, n_test=30, gz=True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_train, 28, 28)), gz)
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", np.arange(n_train) % 10, gz)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", np.arange(n_test) % 10, gz)


def test_synthetic_deterministic_and_not_colour_separable():
    a, b = synthetic_images(200, 10, 32, 3), synthetic_images(200, 10, 32, 3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, synthetic_images(200, 10, 32, 4).images)
    # mean colour does not carry the label: a nearest-class-mean classifier on it is near chance (0.1)
    d = synthetic_images(4000, 10, 32, 5)
    feats = d.images.float().mean(dim=(2, 3))
    tr, te = slice(0, 3000), slice(3000, None)
    means = torch.stack([feats[tr][d.labels[tr] == c].mean(0) for c in range(10)])
    acc = (torch.cdist(feats[te], means).argmin(1) == d.labels[te]).float().mean()
    assert acc < 0.2, f"colour alone predicts the class with accuracy {acc:.2f}"


def test_splits_disjoint_val_from_train_and_test():
    cfg = DataConfig(synthetic_train=300, val_size=50)
    s = load_splits(cfg)
    assert len(s.val) == 50 and len(s.train) == 300
    key = lambda x: {bytes(im.numpy()) for im in x.images}
    assert not key(s.val) & key(s.test) and not key(s.val) & key(s.train)
    s2 = load_splits(DataConfig(synthetic_train=300, val_size=20, val_from="test"))
    assert not key(s2.val) & key(s2.test) and len(s2.train) == 300


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    make_fmnist(tmp_path / "fm", gz=gz)
    s = load_splits(DataConfig(source="fashion-mnist", root=str(tmp_path / "fm"), val_size=10))
    assert s.shape == (1, 28, 28) and len(s.train) == 50 and len(s.test) == 30 and s.num_classes == 10


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(DataConfig(source="fashion-mnist", root=str(tmp_path / "missing")))
    make_fmnist(tmp_path / "fm")
    p = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100]))  # truncated payload
    with pytest.raises(DataError, match="train-images"):
        load_splits(DataConfig(source="fashion-mnist", root=str(tmp_path / "fm"), val_size=10))
    p.write_bytes(b"garbage, not gzip")
    with pytest.raises(DataError, match="train-images"):
        load_splits(DataConfig(source="fashion-mnist", root=str(tmp_path / "fm"), val_size=10))
    huge = struct.pack(">HBB", 0, 8, 4) + struct.pack(">4I", *[2**32 - 1] * 4)  # 2^128 bytes: np.prod would wrap
    p.write_bytes(gzip.compress(huge))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: IDX header says dims \(4294967295, "):
        load_splits(DataConfig(source="fashion-mnist", root=str(tmp_path / "fm"), val_size=10))
    write_idx(p, np.zeros((0, 28, 28)))
    write_idx(tmp_path / "fm" / "train-labels-idx1-ubyte.gz", np.zeros(0))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: holds no images"):
        load_splits(DataConfig(source="fashion-mnist", root=str(tmp_path / "fm"), val_size=10))


def make_cifar10(root, n=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(np.arange(n) % 10)}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    return d


def test_cifar10_and_100(tmp_path):
    make_cifar10(tmp_path / "c10")
    s = load_splits(DataConfig(source="cifar10", root=str(tmp_path / "c10"), val_size=10))
    assert s.shape == (3, 32, 32) and len(s.train) == 90 and len(s.test) == 20
    d = tmp_path / "c100" / "cifar-100-python"
    d.mkdir(parents=True)
    for name in ("train", "test"):
        batch = {b"data": np.zeros((30, 3072), np.uint8), b"fine_labels": list(np.arange(30) % 100),
                 b"coarse_labels": [0] * 30}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    s = load_splits(DataConfig(source="cifar100", root=str(tmp_path / "c100"), val_size=5))
    assert s.num_classes == 100 and len(s.train) == 25


class Evil:
    """Unpickled, it opens (creates) ``target`` for writing: code run by a plain pickle.load."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_cifar_restricted_unpickler_refuses_code(tmp_path):
    d = make_cifar10(tmp_path / "c10")
    pwned = tmp_path / "pwned"
    evil = pickle.dumps({b"data": Evil(pwned), b"labels": []})
    (d / "data_batch_1").write_bytes(evil)
    with pytest.raises(DataError, match="forbidden global"):
        load_splits(DataConfig(source="cifar10", root=str(tmp_path / "c10"), val_size=10))
    assert not pwned.exists(), "the batch's code ran"
    pickle.loads(evil)[b"data"].close()  # (what a plain unpickler does with it: the check above can fail)
    assert pwned.exists()
    (d / "data_batch_1").write_bytes(b"\x80\x02corrupt")
    with pytest.raises(DataError, match="data_batch_1"):
        load_splits(DataConfig(source="cifar10", root=str(tmp_path / "c10"), val_size=10))


def test_imagefolder_any_resolution(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("n01", "n02"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 90, 2)
                im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                im.save(tmp_path / split / c / f"{i}.{'JPEG' if i % 2 else 'png'}")
    s = load_splits(DataConfig(source="imagefolder", root=str(tmp_path), img_size=24, val_size=2))
    assert s.shape == (3, 24, 24) and len(s.train) == 10 and len(s.test) == 4 and s.num_classes == 2
    (tmp_path / "train" / "n01" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path), img_size=24, val_size=2))


def test_loader_deterministic_and_sharded():
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 8, 8).contiguous()
    y = torch.arange(40)
    a = TensorBatches(x, y, 8, augment="crop_flip", seed=1)
    a.set_epoch(3)
    b = TensorBatches(x, y, 8, augment="crop_flip", seed=1)
    b.set_epoch(3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))

    def order(seed, epoch):
        t = TensorBatches(x, y, 8, augment="crop_flip", seed=seed)
        t.set_epoch(epoch)
        return torch.cat([lab for _, lab in t]).tolist()

    # a function of (seed, epoch): another epoch or seed shuffles otherwise, and every image once per epoch
    assert order(1, 3) == order(1, 3) and order(1, 3) != order(1, 4) and order(1, 3) != order(2, 3)
    assert order(1, 3) != list(range(40)) and sorted(order(1, 4)) == list(range(40))
    shards = [TensorBatches(x, y, 4, rank=r, world_size=2, seed=1) for r in range(2)]
    seen = [torch.cat([lab for _, lab in s]) for s in shards]
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    assert sorted(seen[0].tolist() + seen[1].tolist()) == list(range(40))


def test_clean_training_images_are_held_once_and_a_defense_copies_them():
    """poison.kind = "none": the training split's images are the clean ones, not a second copy (1 x the split less
    for the whole run); a baseline defense makes its own tensor and leaves the clean images as they were."""
    from pst_dist.config import load_config
    from pst_dist.data.pipeline import build_data

    tiny = ["--data.source=synthetic", "--data.synthetic_train=64", "--data.img_size=16", "--data.val_size=16"]
    data = build_data(load_config(None, tiny))
    assert data.poisoned_train.data_ptr() == data.splits.train.images.data_ptr()
    jpeg = build_data(load_config(None, [*tiny, "--defense.kind=jpeg"]))
    assert torch.equal(jpeg.splits.train.images, data.splits.train.images), "the defense wrote into the clean images"
    assert not torch.equal(jpeg.poisoned_train, jpeg.splits.train.images)


def test_training_lets_the_clean_images_go_once_a_poisoned_copy_is_made_and_trains_the_same(tmp_path):
    """keep_clean=False (train, the bench's cells, tune's attack runs): with a poison (or a squeezing defense) the
    clean training images were held beside the poisoned copy for the whole run, 1 x the split (GBs at ImageNet size
    in every process), though training reads only the copy. Now only their shape, labels and rows stay (a meta
    tensor: a read of its values fails), and the run trains to the same model."""
    from pst_dist.config import load_config
    from pst_dist.data.pipeline import build_data
    from pst_dist.train import train

    tiny = ["--data.source=synthetic", "--data.synthetic_train=128", "--data.img_size=16", "--data.val_size=32",
            "--poison.kind=classwise_noise", "--model.width=0.125", "--train.epochs=1", "--train.batch_size=32",
            "--log.progress=false", "--log.tensorboard=false", "--train.device=cpu"]
    kept = build_data(load_config(None, tiny))
    let_go = build_data(load_config(None, tiny), keep_clean=False)
    gone, there = let_go.splits.train, kept.splits.train
    assert gone.images.is_meta and gone.images.shape == there.images.shape and not there.images.is_meta
    assert torch.equal(gone.labels, there.labels) and let_go.splits.shape == kept.splits.shape
    assert torch.equal(let_go.poisoned_train, kept.poisoned_train)
    for read in (lambda t: t.numpy(), lambda t: t.cpu(), lambda t: t.float().mean().item()):
        with pytest.raises((TypeError, NotImplementedError, RuntimeError)):
            read(gone.images)
    unpoisoned = [t for t in tiny if not t.startswith("--poison")]
    clean = build_data(load_config(None, unpoisoned), keep_clean=False)  # no copy made: one tensor, kept
    assert clean.poisoned_train is clean.splits.train.images and not clean.poisoned_train.is_meta
    sums = [train(load_config(None, [*tiny, f"--log.run_dir={tmp_path / name}"]), data=d)["model_checksum"]
            for name, d in (("kept", kept), ("let_go", let_go))]
    assert sums[0] == sums[1]
