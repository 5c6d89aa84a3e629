import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY


@pytest.mark.multiproc
def test_two_process_gloo_training_stays_in_sync(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "dist_worker.py"), str(tmp_path), *TINY, "--train.epochs=1",
           "--train.device=cpu", "--poison.kind=patch_noise", f"--log.run_dir={run}",
           '--schedule.stages=[{name="a",steps=2},{name="b",freeze=[0,1]}]']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                         "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2
    assert r0["model_checksum"] == r1["model_checksum"], "ranks diverged: gradients not averaged"
    assert r0["steps"] == 256 // 2 // 32  # each rank saw its half of the training set
    assert (run / "summary.json").is_file() and (run / "checkpoint.pt").is_file()
