"""How users run it (issue 14), without a Ray cluster: where a run lives, the console command,
`coin-ray config`, the example config, and user errors as one stderr line with a documented
exit code. Every CLI check runs the real command in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from coin_ray.config import Config, ConfigError, from_dict, load_config
from coin_ray.errors import EXIT_BAD_INPUT, EXIT_CREDENTIAL, Unreachable
from coin_ray.location import (DEFAULT_HOME, JOB_CONFIG_ENV, cwd_is_temporary, refuse_unshared,
                               resolve_config, resolve_output)
from coin_ray.preflight import stop_if_unreachable

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TOKEN = "f3a9c1e7b2d44e0a9c1e7b2d44e0a9c1"  # a token pasted where the variable's NAME belongs
JOB_ENV = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}})}
RAY_COPY = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_0123"


# -- where a run lives ---------------------------------------------------------------------------

def test_relative_storage_is_absolute_against_the_current_folder(tmp_path):
    assert resolve_output("runs", cwd=str(tmp_path), env={}) == str(tmp_path / "runs")
    assert resolve_output("s3://b/runs", cwd=str(tmp_path), env={}) == "s3://b/runs"
    assert resolve_output("/abs/runs/", cwd=str(tmp_path), env={}) == "/abs/runs"
    assert resolve_output("~/r", cwd=str(tmp_path), env={}) == os.path.expanduser("~/r")
    assert resolve_output("", cwd=str(tmp_path), env={}) == ""


@pytest.mark.parametrize("cwd, env", [(RAY_COPY, {}), ("/srv/anything", JOB_ENV)])
def test_never_inside_rays_temporary_copy_of_the_working_dir(cwd, env, tmp_path):
    assert cwd_is_temporary(cwd, env)
    assert resolve_output("runs", cwd=cwd, env=env) == os.path.join(os.path.expanduser(DEFAULT_HOME), "runs")
    home = {**env, "COIN_RAY_HOME": str(tmp_path)}
    assert resolve_output("runs", cwd=cwd, env=home) == str(tmp_path / "runs")
    assert not cwd_is_temporary(str(tmp_path), {})


def test_resolve_config_makes_outputs_and_inputs_absolute_once(tmp_path):
    cfg = load_config(None, ["data.target_images=imgs", "cloud.cache=c", "data.world_cache=w"])
    job = resolve_config(cfg, cwd=RAY_COPY, env={**JOB_ENV, "COIN_RAY_HOME": str(tmp_path)})
    assert job.storage == str(tmp_path / "runs") and job.cloud.cache == str(tmp_path / "c")
    assert job.data.world_cache == str(tmp_path / "w")
    assert job.data.target_images == os.path.abspath("imgs")  # an input: read from the upload
    assert resolve_config(job, cwd="/elsewhere", env={}) == job  # idempotent: resolved once


def test_a_local_storage_on_several_nodes_is_refused_in_one_line():
    refuse_unshared("/data/runs", 1, env={})
    refuse_unshared("s3://b/runs", 3, env={})
    refuse_unshared("/nfs/runs", 3, env={"COIN_RAY_SHARED_STORAGE": "1"})
    with pytest.raises(Exception, match="has 3 nodes: set storage=s3://") as err:
        refuse_unshared("/data/runs", 3, env={})
    assert "\n" not in str(err.value)


def test_first_batch_of_connection_failures_stops_naming_the_url():
    stop_if_unreachable(["", "connection"], "http://x:1")  # one answered: per-image errors only
    stop_if_unreachable([], "http://x:1")
    stop_if_unreachable(["connection", "timeout"], "http://x:1")  # a slow cloud is still there
    with pytest.raises(Unreachable, match="nothing answers at http://x:1"):
        stop_if_unreachable(["connection"] * 3, "http://x:1")


# -- config ---------------------------------------------------------------------------------------

def test_token_env_accepts_only_variable_names():
    assert load_config(None, ["cloud.token_env=DDS_API_TOKEN_2"]).cloud.token_env == "DDS_API_TOKEN_2"
    for bad in (TOKEN, TOKEN.upper(), "dds_token", "Dds-Token", "9TOKEN"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"cloud.token_env={bad}"])
        assert bad not in str(err.value)


def test_coin_ray_config_prints_every_key_with_its_range():
    proc = subprocess.run([PY, "-m", "coin_ray.cli", "config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert from_dict(yaml.safe_load(proc.stdout)) == Config()  # loads back as the defaults
    leaves = [line for line in proc.stdout.splitlines()
              if not line.startswith("#") and not line.rstrip().endswith(":") and "#" not in line.split(":")[0]]
    assert len(leaves) > 80 and all("  # " in line for line in leaves), [l for l in leaves if "  # " not in l]
    assert "pi: 0.7  # [0.0, 1.0]; CKG confidence threshold" in proc.stdout
    assert "backend: http  # one of: http, dds, rekognition, hf, replay" in proc.stdout
    assert "max_in_flight: 8  # [1, inf)" in proc.stdout


def test_the_example_config_for_own_data_loads_as_it_is():
    cfg = load_config(str(ROOT / "examples" / "my_data.yaml"))
    assert cfg.data.target_images.startswith("s3://") and cfg.cloud.token_env == "DDS_API_TOKEN"


def test_console_command_is_declared_and_jobs_stay_thin():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'coin-ray = "coin_ray.cli:main"' in text
    for job in ("adapt", "tune", "predict"):
        code = [l for l in (ROOT / "jobs" / f"{job}.py").read_text().split('"""')[-1].splitlines() if l.strip()]
        assert len(code) <= 8 and f'main(["{job}", *sys.argv[1:]])' in code[-1]


# -- user errors: one stderr line, the documented exit code ---------------------------------------

def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([PY, "-m", "coin_ray.cli", *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    (folder / "a.png").write_bytes((ROOT / "docs" / "foggy_shapes.png").read_bytes())
    return folder


def test_missing_folder(tmp_path):
    proc = run_cli("adapt", f"data.target_images={tmp_path / 'nope'}", f"storage={tmp_path}")
    assert_one_line(proc, EXIT_BAD_INPUT, f"data.target_images: {tmp_path / 'nope'} does not exist")
    debug = run_cli("adapt", "--debug", f"data.target_images={tmp_path / 'nope'}", f"storage={tmp_path}")
    assert debug.returncode == EXIT_BAD_INPUT and "Traceback" in debug.stderr


def test_missing_bucket(s3_bucket, tmp_path):
    proc = run_cli("adapt", "data.target_images=s3://no-such-bucket-coin/imgs", f"storage={tmp_path}")
    assert_one_line(proc, EXIT_BAD_INPUT, "s3://no-such-bucket-coin/imgs")


def test_empty_folder_stops_before_any_stage(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("adapt", f"data.target_images={tmp_path / 'empty'}", f"storage={tmp_path / 'runs'}")
    assert_one_line(proc, EXIT_BAD_INPUT, f"0 images found under {tmp_path / 'empty'}")
    assert "stage" not in proc.stdout and not (tmp_path / "runs").exists()


def test_unset_token_variable(images, tmp_path):
    proc = run_cli("adapt", f"data.target_images={images}", f"storage={tmp_path}", "cloud.backend=dds",
                   "cloud.token_env=COIN_TEST_UNSET_TOKEN", env={"COIN_TEST_UNSET_TOKEN": ""})
    assert_one_line(proc, EXIT_CREDENTIAL, "COIN_TEST_UNSET_TOKEN, which is not set")


def test_a_pasted_token_is_refused_and_never_printed(images, tmp_path):
    proc = run_cli("adapt", f"data.target_images={images}", f"storage={tmp_path}", f"cloud.token_env={TOKEN}")
    assert_one_line(proc, EXIT_BAD_INPUT, "cloud.token_env: must be the NAME of an environment variable")
    assert TOKEN not in proc.stdout + proc.stderr and not list(tmp_path.rglob("config.yaml"))


def test_cloud_url_nothing_answers(images, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("adapt", f"data.target_images={images}", f"storage={tmp_path}", f"cloud.url={url}")
    assert_one_line(proc, EXIT_BAD_INPUT, f"nothing answers at {url}")


def test_a_clip_model_that_cannot_load_stops_before_any_paid_call(images, tmp_path, served):
    """Issue 27, 4.1: the cloud answered every image before a hub id failed to load."""
    server = served()
    proc = run_cli("adapt", f"data.target_images={images}", f"storage={tmp_path}", f"cloud.url={server.url}",
                   "clip.model=coin-test/no-such-clip", env={"HF_HUB_OFFLINE": "1"})
    assert_one_line(proc, EXIT_BAD_INPUT, "clip.model: coin-test/no-such-clip is not in the local Hugging Face cache")
    assert server.stats()["requests"] == 0 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["adapt", "--stages", "collekt"], "--stages: unknown stage 'collekt'"),
    (["adapt", "train.distill.pi=1.5"], "train.distill.pi: 1.5 is out of range"),
    (["adapt", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["predict", "--model", "/no/model", "--images", "/no/images", "--out", "x.json"], "--model: /no/model/export.json"),
    (["tune", "--space", "/no/space.yaml"], "/no/space.yaml"),
])
def test_bad_input_is_one_line(args, needle):
    assert_one_line(run_cli(*args), EXIT_BAD_INPUT, needle)


def test_help_and_a_config_error_import_neither_ray_nor_torch():
    """Issue 27, 4.9: `coin-ray --help` took 7-9 s and a config error 12-35 s (Ray and torch
    were imported before the arguments were read). Now the config is checked first."""
    code = ("import sys\nfrom coin_ray.cli import main\nrc = main(['adapt', 'train.distill.pi=1.5'])\n"
            "try:\n    main(['adapt', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('RC', rc, 'HEAVY', [m for m in ('ray', 'torch', 'transformers') if m in sys.modules])")
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert "RC 2 HEAVY []" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_dead_ray_address_fails_fast_naming_it(images):
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_cli("predict", "--model", str(images), "--images", str(images), "--out", "x.json",
                   env={"RAY_ADDRESS": address})
    assert time.monotonic() - start < 30
    assert_one_line(proc, EXIT_BAD_INPUT, f"RAY_ADDRESS={address}")


def test_an_address_that_accepts_but_never_answers_ends_within_30_s(tmp_path):
    """A port that accepts connections and says nothing (a hung head): ray.init gets a deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.extend(listener.accept() for _ in range(1000)), daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "export.json").write_text("{}")
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "a.png").write_bytes((ROOT / "docs" / "foggy_shapes.png").read_bytes())
    start = time.monotonic()
    try:
        proc = run_cli("predict", "--model", str(tmp_path / "m"), "--images", str(tmp_path / "i"),
                       "--out", str(tmp_path / "x.json"), env={"RAY_ADDRESS": address}, timeout=90)
    finally:
        listener.close()
    assert time.monotonic() - start < 30, proc.stderr
    assert_one_line(proc, EXIT_BAD_INPUT, f"RAY_ADDRESS={address}")
