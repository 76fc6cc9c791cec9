"""Shared fixtures: a real S3 protocol server (moto's server mode) on 127.0.0.1, the project's
detector server on a loopback port, and the expensive things built once per session (per xdist
worker): the local Ray of the modules that run Ray in-process, the tiny Foggy-Shapes world and
the README's tiny try (one whole adaptation, run as a user runs it, whose console and outputs
several tests read)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch

from coin_ray.serve import free_port
from readme_doc import readme_commands

ROOT = Path(__file__).resolve().parents[1]

LOCAL_RAY_CPUS = 4  # logical CPUs of the tests' in-process Ray (``session_ray``)


# The test files that run Ray pipelines, longest first (`--durations`, 2026-12-08). With
# `--dist loadfile --no-loadscope-reorder` (scripts/test) a worker takes whole files in this
# order: the long files start first and the many short ones fill both workers' ends, instead
# of xdist's default order (most tests first), which left the long files for last.
LONGEST_FIRST = ["test_entry_cluster.py", "test_console.py", "test_tune.py", "test_ray_train.py",
                 "test_cloud_collect.py", "test_adapt_job.py", "test_ray_distill.py", "test_spend_cap.py",
                 "test_serve_model.py", "test_export.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run ``LONGEST_FIRST``'s files first, in its order; every other file after them, as
    collected (the sort is stable, so tests keep their order within a file)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def s3_env(endpoint: str) -> dict[str, str]:
    """The AWS environment that points boto3, pyarrow and s3fs at the loopback S3 server."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def start_local_ray(num_cpus: int, log_to_driver: bool = False) -> ModuleType:
    """A fresh local Ray (never an existing cluster) with ``num_cpus`` logical CPUs; returns ``ray``."""
    import ray

    from coin_ray.ray.cluster import NO_PREEMPTION_WATCHER

    # As the product's own local instance (cluster.join): no Ray Train preemption watcher, an
    # actor per training run that would watch a single machine nobody drains.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
             runtime_env={"env_vars": dict(NO_PREEMPTION_WATCHER)})
    return ray


def cache_home_of_its_own(home) -> str:
    """Make ``home`` a cache home whose ``world`` folder is the user's (built Foggy-Shapes
    worlds stay shared; answers do not); returns it for ``$COIN_RAY_CACHE``."""
    from coin_ray.location import cache_home

    worlds = os.path.join(cache_home(), "world")
    os.makedirs(worlds, exist_ok=True)
    (home / "world").symlink_to(worlds, target_is_directory=True)
    return str(home)


@pytest.fixture(scope="module", autouse=True)
def module_answer_cache(tmp_path_factory):
    """Module-scoped fixtures (a collected run shared by a module's tests) get a cache home of
    their own: autouse fixtures are set up before the other fixtures of their scope."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COIN_RAY_CACHE", cache_home_of_its_own(tmp_path_factory.mktemp("module-cache")))
        yield


@pytest.fixture(autouse=True)
def own_answer_cache(module_answer_cache, tmp_path_factory, monkeypatch):
    """Every test gets a cache home of its own (``$COIN_RAY_CACHE``), so no test reads answers
    another test (or the user) paid for. Subprocesses inherit it."""
    home = tmp_path_factory.mktemp("cache-home")
    monkeypatch.setenv("COIN_RAY_CACHE", cache_home_of_its_own(home))
    yield home


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for the test (the result of training must not depend on the
    CPU's thread count; on a shared 2-core machine more threads only spin and wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def session_ray(s3_endpoint):
    """One local Ray per test process (each xdist worker starts its own), shared by every module
    that runs Ray in-process: a start costs about 7 CPU-s, and Ray Data's and Ray Train's helper
    actors then start once, not once per module. Its workers see the loopback S3 server and send
    their logs to the driver (so capfd sees them); yields ``ray``."""
    # Ray workers inherit the environment at ray.init: point them at the loopback S3 for the
    # init only, so the tests' own environment stays as each test sets it.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_env(s3_endpoint).items():
            mp.setenv(key, value)
        ray = start_local_ray(LOCAL_RAY_CPUS, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(request, session_ray):
    """The session's local Ray for one test module, whose functions its workers get by value
    (workers cannot import modules from tests/); yields ``ray``."""
    session_ray.cloudpickle.register_pickle_by_value(request.module)
    try:
        yield session_ray
    finally:
        session_ray.cloudpickle.unregister_pickle_by_value(request.module)


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's S3 server on a loopback port for the session; yields its URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A fresh bucket on the loopback S3 server, with the AWS env pointing at it.

    Yields the bucket name; subprocesses inherit the environment (endpoint + dummy keys).
    """
    import boto3

    for key, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    bucket = f"coin-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield bucket


@pytest.fixture
def served():
    """``served(**knobs)`` starts the detector server around ``cloud_world.ColourBoxes`` with
    those ``coin_ray.serve.Knobs`` on a free loopback port; every server stops after the test."""
    from cloud_world import ColourBoxes
    from coin_ray.serve import Knobs, start_server

    servers = []

    def start(**knobs):
        s = start_server(ColourBoxes(), Knobs(**knobs))
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def tiny_world():
    """The tiny Foggy-Shapes world where ``data.world=tiny`` runs find it ($COIN_RAY_CACHE, else
    ~/.cache/coin_ray): built at most once, shared by every test that only reads it."""
    from coin_ray.world.build import build_world

    return build_world("tiny")


@pytest.fixture(scope="session")
def shell_env(tmp_path_factory) -> dict[str, str]:
    """PATH as after `source .venv/bin/activate`: this interpreter's python, ray and coin-ray."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "coin-ray"  # the installed console script, or the same entry point
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m coin_ray.cli "$@"\n')
    shim.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "COIN_RAY_VERBOSE")}
    return {**env, "PATH": path, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}


@dataclass(frozen=True)
class ShellRun:
    """A README command run in ``cwd`` through bash, as a user pastes it."""

    cmd: str
    cwd: Path
    proc: subprocess.CompletedProcess

    @property
    def console(self) -> str:
        return self.proc.stdout + self.proc.stderr


def run_in_shell(cmd: str, cwd: Path, env: dict[str, str], timeout: float = 840) -> ShellRun:
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    (cwd / "console.txt").write_text(proc.stdout + proc.stderr)  # kept for a failing test's reader
    return ShellRun(cmd, cwd, proc)


def tiny_try_command() -> str:
    """The README's tiny try: its one `adapt` command on ``data.world=tiny``."""
    [cmd] = [c for c, _ in readme_commands() if "data.world=tiny" in c and " adapt" in c]
    return cmd


@pytest.fixture(scope="session")
def tiny_try(shell_env, tiny_world, tmp_path_factory) -> ShellRun:
    """The README's tiny try, run verbatim once per session from an empty folder (a whole
    adaptation on a local Ray: collect to export). test_readme checks it succeeds as the
    README says, test_console reads its console; a broken pipeline fails both."""
    home = cache_home_of_its_own(tmp_path_factory.mktemp("tiny-try-cache"))  # its answers are its own
    return run_in_shell(tiny_try_command(), tmp_path_factory.mktemp("tiny-try"), {**shell_env, "COIN_RAY_CACHE": home})
