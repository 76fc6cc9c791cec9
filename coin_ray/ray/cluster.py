"""Joining Ray without hanging, and the checks that need the cluster's shape.

``ray.init()`` against a dead address waits for minutes, printing GCS warnings: an address
recorded by an earlier ``ray start`` (``RAY_ADDRESS=auto``) or a mistyped host. ``join``
first resolves the address and checks that something listens there (a TCP connect), then
gives ``ray.init`` a deadline; past it the command ends with one line naming the address.
"""

from __future__ import annotations

import _thread
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import MutableMapping, TextIO

import ray

from coin_ray import errors
from coin_ray.errors import EXIT_BAD_INPUT, Unreachable, one_line
from coin_ray.location import refuse_unshared
from coin_ray.ray.console import quiet_ray_data, worker_env_vars
from coin_ray.preflight import probe_ray_address
from coin_ray.ray.progress_feed import filter_known_ray_noise

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 20.0  # the most ray.init may take to join
NO_PREEMPTION_WATCHER = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # the workers of a local instance
COMMAND_DEADLINE_S = 24.0  # + the 5 s fallback: a dead RAY_ADDRESS ends a command within 30 s


def resolve_address(address: str) -> str:
    """``RAY_ADDRESS`` as host:port (``auto`` looked up as Ray does); raises Unreachable."""
    probe_ray_address(address)  # dashboard URLs refused, literal addresses probed
    if address.startswith("ray://"):
        return address[len("ray://"):]
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as err:
        raise Unreachable(f"RAY_ADDRESS={address}: no running Ray cluster found ({one_line(err)}); "
                          "start one with `ray start --head` or unset RAY_ADDRESS") from None
    if resolved is None:
        raise Unreachable(f"RAY_ADDRESS={address}: no running Ray cluster found; "
                          "start one with `ray start --head` or unset RAY_ADDRESS")
    return resolved


def seconds_left(total_s: float = COMMAND_DEADLINE_S) -> float:
    """What is left of ``total_s`` since this process started (imports included)."""
    import psutil  # a Ray dependency

    return total_s - (time.time() - psutil.Process().create_time())


def _watchdog(address: str, timeout_s: float) -> threading.Timer:
    """Interrupts ``ray.init`` (its retry loop sleeps in Python) after ``timeout_s``; if it is
    stuck in native code instead, ends the process with one line 5 s later."""
    def give_up() -> None:
        _thread.interrupt_main()
        time.sleep(5.0)
        print(f"error: the Ray cluster at RAY_ADDRESS={address} did not answer within {timeout_s:.0f} s",
              file=errors.verdict_stream or sys.__stderr__, flush=True)
        os._exit(EXIT_BAD_INPUT)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    return timer


def plain_log_prefixes(stream: TextIO | None = None, env: MutableMapping[str, str] | None = None) -> None:
    """No colour codes in worker lines when the console is a file or a pipe.

    Ray wraps the "(pid=...)" prefix of every worker line it forwards to the driver in ANSI
    colour codes, a terminal or not; in a redirected log they are noise. It reads
    RAY_COLOR_PREFIX when it prints, so setting it to 0 here (unless the user set it) is enough.
    """
    env = os.environ if env is None else env
    stream = sys.stdout if stream is None else stream
    if "RAY_COLOR_PREFIX" not in env and (not stream.isatty() or "NO_COLOR" in env):
        env["RAY_COLOR_PREFIX"] = "0"


def private_instance_token(env: MutableMapping[str, str] | None = None, home: Path | None = None) -> bool:
    """Give a fresh local instance a token of its own (``RAY_AUTH_TOKEN``) when Ray would
    otherwise write ``~/.ray/auth_token``; returns whether it did.

    Ray 2.60's ``ray.init()`` turns token authentication on for an instance it starts when
    ``RAY_AUTH_MODE`` is unset, and writes a new token to ``~/.ray/auth_token`` when it finds
    none (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, that file). That file then silently
    turns token authentication on for every later ``ray start --head`` on the machine, and
    ``ray job submit`` fails there unless ``RAY_AUTH_MODE=token``. A token in this process's
    environment (the workers inherit it) protects the instance the same way and writes nothing.
    A mode or a token the user chose is left alone.
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    if "RAY_AUTH_MODE" in env or env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") \
            or (home / ".ray" / "auth_token").exists():
        return False
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # 256 bits, as Ray's own generator
    return True


def join(num_cpus: int | None = None, timeout_s: float = JOIN_TIMEOUT_S) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a fresh local Ray instance.

    ``ray job submit`` sets RAY_ADDRESS, so jobs join their cluster; set it yourself
    (``RAY_ADDRESS=auto``) to join a cluster started with ``ray start``. Without it a new
    local instance is started (``num_cpus`` of them, or all): a bare ``ray.init()`` would try
    the last cluster recorded on this machine. Ray refuses ``num_cpus`` when joining, so it
    is ignored under RAY_ADDRESS. Raises Unreachable within ``timeout_s`` for a dead address.
    """
    if ray.is_initialized():
        return
    plain_log_prefixes()
    address = os.environ.get("RAY_ADDRESS", "")
    # transformers' chatter off in every worker (coin_ray.ray.console); merged by Ray with a
    # `ray job submit` runtime_env, whose own keys are left alone.
    env = worker_env_vars()
    if address in ("", "local"):  # "local": a fresh instance even when a cluster runs here
        private_instance_token()
        # One machine nobody drains: Ray Train's preemption watcher (an actor per training
        # stage, for nodes a cluster's autoscaler takes away) would watch for nothing.
        env |= {k: v for k, v in NO_PREEMPTION_WATCHER.items() if k not in os.environ}
        ray.init(address="local", num_cpus=num_cpus or None, runtime_env={"env_vars": env})
        return
    if num_cpus:
        log.warning("--num-cpus is ignored when connecting to an existing cluster (RAY_ADDRESS)")
    hostport = resolve_address(address)
    probe_ray_address(address, hostport)
    budget = max(3.0, min(timeout_s, seconds_left()))
    timer = _watchdog(address, budget)
    timer.start()
    try:
        ray.init(**({"runtime_env": {"env_vars": env}} if env else {}))
    except KeyboardInterrupt:
        raise Unreachable(f"the Ray cluster at RAY_ADDRESS={address} did not answer within {budget:.0f} s") from None
    except (ConnectionError, RuntimeError) as err:  # what ray.init raises when no GCS answers
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise Unreachable(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {first}") from None
    finally:
        timer.cancel()


def init_ray(num_cpus: int | None = None) -> None:
    """``join`` (failing fast when RAY_ADDRESS is dead, else a local instance); Ray's
    known-harmless noise and its INFO chatter then stay off the console
    (``coin_ray.ray.console``). Imports no model code."""
    join(num_cpus)
    filter_known_ray_noise()
    quiet_ray_data()


def alive_nodes() -> int:
    """Nodes of the joined cluster that are alive."""
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_storage(storage_uri: str, key: str = "storage") -> None:
    """Refuse (UserError, one line) a local storage folder (or answer cache, ``key``) on a
    multi-node cluster."""
    refuse_unshared(storage_uri, alive_nodes(), key=key)
