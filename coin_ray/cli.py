"""The ``coin-ray`` console command: ``coin-ray adapt | tune | predict | serve | world | config``.

    coin-ray adapt --config my.yaml            # = python jobs/adapt.py --config my.yaml
    coin-ray serve --run runs/<id>             # its detector on Ray Serve (--backend: a cloud-side one)
    coin-ray config > my.yaml                  # every key, its default and its range

Output: progress, logs and results go to stdout; stderr carries only the verdict of a
failed command, so a user's mistake is exactly one line there, with no traceback
(``--debug`` adds it). Exit codes (``coin_ray.errors``): 0 done, 1 the run failed,
2 bad input or setting, 3 a credential missing or refused.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from typing import Callable, Iterator, TextIO

from coin_ray import commands, errors
from coin_ray.config_doc import default_config_yaml
from coin_ray.errors import EXIT_BAD_INPUT, EXIT_CREDENTIAL, EXIT_FAILED, EXIT_OK, UserError, one_line
from coin_ray.preflight import probe_ray_address
from coin_ray.serve import main as serve_main

# Exceptions of modules that may not be imported (Ray-side ones are imported lazily):
# (module, class) -> exit code. Anything not listed here is a failure with its traceback.
KNOWN_ERRORS = {("coin_ray.config", "ConfigError"): EXIT_BAD_INPUT,
                ("coin_ray.search_space", "SpaceError"): EXIT_BAD_INPUT,
                ("coin_ray.sweep", "SweepInputsMissing"): EXIT_BAD_INPUT,
                ("coin_ray.cloud.errors", "AuthError"): EXIT_CREDENTIAL,
                ("coin_ray.ray.collect", "CategoriesUnknown"): EXIT_BAD_INPUT,  # before its base class
                ("coin_ray.ray.collect", "CollectionStopped"): EXIT_CREDENTIAL,
                ("ray.exceptions", "AuthenticationError"): EXIT_CREDENTIAL}  # Ray 2.60 token auth


def exit_code_for(err: BaseException) -> int | None:
    """The documented exit code of a user error, or None for anything else."""
    if isinstance(err, UserError):
        return err.exit_code
    for (module, name), code in KNOWN_ERRORS.items():
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return code
    return None


@contextlib.contextmanager
def diagnostics_on_stdout() -> Iterator[TextIO]:
    """Send everything written to stderr (Python and native code: Ray's C++ logs too) to
    stdout while the command runs; yields a stream on the real stderr for the verdict."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(1, 2)
    verdict = os.fdopen(os.dup(saved), "w")
    errors.verdict_stream = verdict
    try:
        with contextlib.redirect_stderr(sys.stdout):
            yield verdict
    finally:
        errors.verdict_stream = None
        sys.stdout.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``command`` with diagnostics on stdout; a user error becomes one stderr line."""
    with diagnostics_on_stdout() as verdict:
        try:
            return command(args)
        except Exception as err:  # noqa: BLE001 (sorted below: user errors vs failures)
            code = exit_code_for(err)
            if code is None:
                traceback.print_exc(file=verdict)
                verdict.flush()
                raise SystemExit(EXIT_FAILED) from None
            if args.debug:
                traceback.print_exc(file=verdict)
            stop_ray()
            print(f"error: {one_line(err)}", file=verdict, flush=True)
            return code
        finally:
            verdict.close()


def stop_ray() -> None:
    """Shut down this process's Ray, if it started one, before the verdict is printed.

    Workers still finishing (callers stopped by a refused token) send their last log lines
    to the driver late; shut down now, they reach stdout before the verdict, which is then
    the last line a user sees, not followed by lines about images nobody asked for.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        sys.stdout.flush()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def print_config(args: argparse.Namespace) -> int:
    sys.stdout.write(default_config_yaml())
    return EXIT_OK


def serves_a_backend(args: list[str]) -> bool:
    """``coin-ray serve --backend ...`` serves a cloud-side backend (coin_ray.serve); without
    --backend, ``coin-ray serve`` serves a run's exported detector on Ray Serve."""
    return any(a == "--backend" or a.startswith("--backend=") for a in args)


def serve(args: argparse.Namespace) -> int:
    serve_main(args.serve_args, prog="coin-ray serve")
    return EXIT_OK


def world(args: argparse.Namespace) -> int:
    """Build (or find, when cached) a Foggy-Shapes world without running anything on it; print
    where its stand-in cloud detector is and the categories that stand-in can answer."""
    for line in commands.ray_side().describe_world(args.size, args.seed):  # torch loads here
        print(line)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of a user error too")
    parser = _Parser(prog="coin-ray", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{adapt,tune,predict,serve,world,config}",
                                parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter
    for name, text, add, fn in (("adapt", commands.ADAPT_HELP, commands.add_adapt_args, commands.adapt),
                                ("tune", commands.TUNE_HELP, commands.add_tune_args, commands.tune),
                                ("predict", commands.PREDICT_HELP, commands.add_predict_args, commands.predict)):
        p = sub.add_parser(name, parents=[common], help=text.splitlines()[0], description=text, formatter_class=fmt)
        add(p)
        p.set_defaults(fn=fn)
    p = sub.add_parser("serve", parents=[common], help=commands.SERVE_HELP.splitlines()[0],
                       description=commands.SERVE_HELP, formatter_class=fmt)
    commands.add_serve_args(p)
    p.set_defaults(fn=commands.serve_model)
    p = sub.add_parser("world", parents=[common], help="build or find the Foggy-Shapes world and its stand-in "
                       "cloud detector (no run); print its checkpoint and the categories it answers")
    p.add_argument("--size", choices=["tiny", "demo", "bench"], default="demo", help="which world (data.world)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed (the run's seed)")
    p.set_defaults(fn=world)
    p = sub.add_parser("config", parents=[common], help="print the default config as commented YAML")
    p.set_defaults(fn=print_config)
    return parser


def check_ray_address(args: argparse.Namespace) -> int:
    """A dead literal RAY_ADDRESS refused in seconds, before Ray and torch are imported."""
    probe_ray_address(os.environ.get("RAY_ADDRESS", ""))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``coin-ray`` and of ``jobs/*.py``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"] and serves_a_backend(argv[1:]):  # python -m coin_ray.serve's own parser
        return serve(argparse.Namespace(serve_args=argv[1:]))
    if argv[:1] in (["adapt"], ["tune"], ["predict"], ["serve"]):
        code = run_guarded(check_ray_address, argparse.Namespace(debug="--debug" in argv))
        if code != EXIT_OK:
            return code
    args = build_parser().parse_args(argv)
    return run_guarded(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
