"""The cluster recipes: every Ray cluster YAML passes Ray's own validation (what `ray up` runs before launching
anything), a broken one does not, and every recipe installs pst-dist the way the README does (`make install`)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
YAMLS = ["aws.yaml", "gcp.yaml", "onprem.yaml"]


def ray_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", YAMLS)
def test_cluster_yaml_passes_ray_validation(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    ray_validate(config)
    setup = " && ".join(config["setup_commands"])
    assert "make install" in setup and "make system-deps" in setup  # the README's install
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("pst-dist/.venv/bin/ray" in c for c in starts)  # Ray runs from the project's venv
    assert config["file_mounts"] == {"~/pst-dist": "."} and ".gitignore" in config["rsync_filter"]
    if "docker" in config:  # the nodes run in containers: the host's shared tune.out is bound into each
        assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
        assert "--tune.out=/mnt/shared/tune" in (CLUSTER / name).read_text()  # the search's storage, under it
        # a GPU worker torch cannot use (its driver older than the CUDA build needs) fails at set-up
        assert any("torch.cuda.is_available()" in c for c in config["worker_setup_commands"])


@pytest.mark.parametrize("break_it", ["unknown_key", "bad_type", "bad_head_type"])
def test_ray_validation_rejects_a_broken_cluster_yaml(break_it):
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    if break_it == "unknown_key":
        config["max_worker"] = 3
    elif break_it == "bad_type":
        config["max_workers"] = "four"
    else:
        config["head_node_type"] = "no_such_type"
    from jsonschema.exceptions import ValidationError  # jsonschema: Ray's own dependency, for its schema check

    with pytest.raises((ValidationError, ValueError)):  # as `ray up` raises (not an ImportError of a moved module)
        ray_validate(config)


def test_kuberay_rayjob_runs_the_search_on_the_project_image():
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "tune/run.py --config" in spec["entrypoint"]
    assert spec["entrypoint"].endswith("--resume=auto")  # a retried job (backoffLimit) continues the search
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + \
        [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1  # every pod runs the image cluster/Dockerfile builds
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in dockerfile and "make install" in dockerfile
    assert "ray[default,train,tune]==2.60.0" in (CLUSTER.parent / "pyproject.toml").read_text()


def test_docker_build_context_leaves_out_host_builds():
    """cluster/Dockerfile copies the repository: the host's venv (with its install stamp, which would make the
    image's `make install` a no-op), runs, data and caches must stay out of the build context."""
    ignored = {line.strip().rstrip("/") for line in (CLUSTER.parent / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "runs", "data", ".git", "**/__pycache__"} <= ignored
    assert "COPY --chown=ray:users . /home/ray/pst-dist" in (CLUSTER / "Dockerfile").read_text()
