import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY = ["--data.source=synthetic", "--data.synthetic_train=256", "--data.val_size=64", "--data.img_size=16",
        "--data.probe_size=64", "--model.width=0.125", "--train.batch_size=32", "--train.epochs=2",
        "--log.progress=false"]
