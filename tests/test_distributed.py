import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pst_dist.distributed import GradBuckets, plan_buckets
from pst_dist.engine import TorchEngine

from .conftest import TINY, child_env


@pytest.mark.multiproc
def test_two_process_gloo_training_stays_in_sync(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "dist_worker.py"), str(tmp_path), *TINY, "--train.epochs=1",
           "--train.device=cpu", "--poison.kind=patch_noise", f"--log.run_dir={run}",
           '--schedule.stages=[{name="a",steps=2},{name="b",freeze=[0,1]}]']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2
    assert r0["model_checksum"] == r1["model_checksum"], "ranks diverged: gradients not averaged"
    assert r0["steps"] == 256 // 2 // 32  # each rank saw its half of the training set
    assert (run / "summary.json").is_file() and (run / "checkpoint.pt").is_file()


@pytest.mark.multiproc
def test_bucketed_overlapped_all_reduce_matches_per_parameter_reference(tmp_path):
    """The torch engine's GradBuckets (all-reduce launched during backward, frozen groups left out) gives the same
    parameters bit for bit as one all-reduce per parameter after backward, through stage changes and the mults=None
    fallback; the frozen group is untouched and has no optimizer state; a parameter without a gradient stays None."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "grad_bucket_worker.py"), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env())
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["checksum"] == r1["checksum"], "ranks diverged"
    for r in (r0, r1):
        assert r["equal_every_step"] == [True] * 8, "bucketed result differs from the per-parameter reference"
        assert r["stem_untouched_while_frozen"] == [True] * 3 and r["stem_no_optimizer_state"] == [True] * 3
        assert r["spare_grad_none"] and r["spare_untouched"] and r["spare_group"] not in (0, 1, 2)
        assert all(0 < n < total for n, total in r["launched_during_backward"]), "none all-reduced during backward"
        assert r["bucket_builds"] == 3  # one per change of the trainable groups, not one per step


def test_plan_buckets_cuts_by_size_and_dtype():
    a, b, c = torch.zeros(10), torch.zeros(10), torch.zeros(30)  # 40, 40, 120 bytes
    h = torch.zeros(10, dtype=torch.float16)
    assert plan_buckets([a, b, c], 80) == [[a, b], [c]]
    assert plan_buckets([a, h, b, c], 1000) == [[a, b, c], [h]]
    assert plan_buckets([], 80) == []


def test_one_process_registers_no_hooks():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": list(model.parameters()), "layer_group": 0}], lr=0.1)
    engine = TorchEngine(model, opt, world_size=1)
    engine.backward(model(torch.ones(1, 3)).sum(), (1.0,))
    engine.step((1.0,))
    assert engine.grad_sync is None and model.weight._post_accumulate_grad_hooks is None


def test_grad_buckets_hooks_go_with_them():
    """Hooks follow the trainable groups (rebuilt on a change only) and leave with a dropped GradBuckets (train_step
    wraps a bare optimizer in a new TorchEngine at every step)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    groups = [{"params": list(m.parameters()), "layer_group": i} for i, m in enumerate(model)]
    buckets = GradBuckets(model, torch.optim.SGD(groups, lr=0.1), world_size=2)
    buckets.arm((0.0, 1.0))
    hooked = lambda: [bool(p._post_accumulate_grad_hooks) for p in model.parameters()]  # noqa: E731
    assert hooked() == [False, False, True, True]
    layout = buckets.buckets
    buckets.finish((0.0, 0.5))  # nothing got a gradient: nothing to all-reduce
    buckets.arm((0.0, 0.5))
    assert buckets.buckets is layout
    buckets.arm((1.0, 1.0))
    assert hooked() == [True] * 4 and buckets.buckets is not layout
    with pytest.raises(ValueError, match="other layer groups"):
        buckets.finish((0.0, 1.0))
    del buckets
    assert hooked() == [False] * 4


NCCL_CHECK = """
import torch, torch.distributed as dist
from pst_dist.distributed import collective_device, summed
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, init_method="tcp://127.0.0.1:{port}")
assert collective_device().type == "cuda"
assert summed([3, 2**40], torch.int64) == [3, 2**40] and summed([0.25], torch.float64) == [0.25]
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a GPU")
def test_cuda_host_values_cross_an_nccl_group():
    """The all-reduce of host values (the epoch's mean loss, the streamed statistics pass's sums) under NCCL, the
    backend of every multi-GPU run: a one-process group on one GPU (two ranks cannot share a GPU under NCCL)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", NCCL_CHECK.format(port=port)], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).parent.parent)
    print(r.stdout, r.stderr[-2000:])
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def _two_ranks(run: Path) -> list[subprocess.Popen]:
    """A long 2-rank gloo run launched as a cluster's job does (the variables, no torchrun agent), checkpointed
    once; rank 0's stderr piped."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for r in (0, 1):
        env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(r),
                        LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2")
        ranks.append(subprocess.Popen([sys.executable, "-m", "pst_dist.cli", "train", *TINY, "--train.epochs=500",
                                       "--train.device=cpu", "--log.tensorboard=false", f"--log.run_dir={run}"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoint.pt").is_file() and ranks[0].poll() is None:
        time.sleep(0.2)
    return ranks


def _end(ranks: list[subprocess.Popen]) -> None:
    """What a test started, and only that, ends with it."""
    import contextlib
    import os
    import signal

    for p in ranks:
        if p.poll() is None:
            p.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
            p.wait()


@pytest.mark.multiproc
def test_a_sigterm_ends_a_rank_blocked_on_a_frozen_rank(tmp_path):
    """A rank whose peer is frozen (SIGSTOP: a node that hangs or is cut off without resetting its connections) waits
    in gloo's all-reduce, a call that does not return to Python, so its SIGTERM handler never runs (was: alive 10
    minutes after the SIGTERM, holding its GPU until torch's 30-minute timeout). It now exits 143 with one line
    TERM_GRACE_S after the SIGTERM, its last checkpoint complete."""
    import os
    import signal
    import time

    from pst_dist.cli import TERM_GRACE_S

    run = tmp_path / "run"
    ranks = _two_ranks(run)
    try:
        assert (run / "checkpoint.pt").is_file(), "the run never checkpointed"
        os.kill(ranks[1].pid, signal.SIGSTOP)
        time.sleep(3)  # rank 0 now waits for rank 1 in the next all-reduce
        t0 = time.time()
        ranks[0].send_signal(signal.SIGTERM)
        _, err = ranks[0].communicate(timeout=TERM_GRACE_S + 60)
        took = time.time() - t0
        assert ranks[0].returncode == 143, err[-3000:]
        assert took < TERM_GRACE_S + 15, took
        assert "pst-dist: terminated (SIGTERM)" in err and "Traceback" not in err, err[-3000:]
        torch.load(run / "checkpoint.pt", weights_only=True)  # complete
    finally:
        _end(ranks)


@pytest.mark.multiproc
def test_a_rank_killed_outright_ends_the_other_with_one_line(tmp_path):
    """Rank 1 killed (-9: the OOM killer, a lost node that resets its connections): rank 0's all-reduce fails at once
    and it exits 1 saying so in one line (was: gloo's 25-line traceback), its last checkpoint complete."""
    run = tmp_path / "run"
    ranks = _two_ranks(run)
    try:
        assert (run / "checkpoint.pt").is_file(), "the run never checkpointed"
        ranks[1].kill()
        _, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 1, err[-3000:]
        said = [line for line in err.splitlines() if not line.startswith("[")]
        assert len(said) == 1 and said[0].startswith("pst-dist: error: rank 0: another rank of the run is gone ("), \
            err[-3000:]
        torch.load(run / "checkpoint.pt", weights_only=True)
    finally:
        _end(ranks)
