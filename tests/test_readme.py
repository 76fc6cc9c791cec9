"""The README and docs/*.md run as written: every shell command in their ```bash blocks is either
run (the cheap ones: help, config, a documented error; the tiny-world try is conftest.tiny_try,
checked in test_console.py) or parsed by the parser the command really uses (a benchmark: its
script's argparse), and every ```yaml block loads as a config. A documented command that
stops working fails here; each test id starts with its page."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import runpy
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from coin_ray.config import load_config
from conftest import run_in_shell, tiny_try_command
from readme_doc import doc_blocks, doc_commands, doc_name, documents, readme_commands

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "my_data.yaml")  # stands in for placeholder configs (my.yaml, s3://...)
RAY_SUBCOMMANDS = {("ray", "start"), ("ray", "stop"), ("ray", "job"), ("ray", "get-auth-token")}
DOCS = documents()


def on_every_page(rows):
    """pytest params for (page, row) over every page, each id "<page>: <row's first item>"."""
    return [pytest.param(*row, id=f"{doc_name(page)}: {row[0]}") for page in DOCS for row in rows(page)]


def is_cheap(cmd: str) -> bool:
    """Run rather than parsed: seconds to a few minutes on the tiny world, no cloud account."""
    return (cmd in ("coin-ray --help", "coin-ray config > my.yaml") or "data.world=tiny" in cmd
            or "/no/such/" in cmd)


def cli_argv(cmd: str) -> list[str] | None:
    """The coin-ray argv a command amounts to (`python jobs/x.py`, `ray job submit -- ...`)."""
    words = shlex.split(cmd)
    if words[:3] == ["ray", "job", "submit"]:
        words = words[words.index("--") + 1:]
    if words[:1] == ["coin-ray"]:
        return words[1:]
    if words[:1] == ["python"] and words[1].startswith("jobs/"):
        return [Path(words[1]).stem, *words[2:]]
    return None


class _Parsed(Exception):
    """Raised by ``parse_args`` once it has parsed: the script stops there."""


def parse_only(script: str, args: list[str]) -> None:
    """``script`` accepts ``args`` (and its dotted overrides load as a config).

    The script runs in this process as ``__main__`` up to its ``parse_args``, which parses and
    then stops it (the heavy imports are already loaded here: no interpreter start per command).
    """
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        parse(self, *a, **k)
        raise _Parsed

    said = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(said):
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        mp.setattr(sys, "argv", [script, *args])
        mp.setattr(sys, "path", list(sys.path))  # scripts may put their own folder first
        mp.chdir(ROOT)
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except _Parsed:
            pass
        except SystemExit as stop:
            pytest.fail(f"{script} {' '.join(args)}: exit {stop.code}: {said.getvalue()[-2000:]}")
        else:
            pytest.fail(f"{script} never parsed its arguments")
    load_config(None, [a for a in args if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=\S+", a)])


def check_parses(cmd: str) -> None:
    from coin_ray.cli import build_parser

    argv = cli_argv(cmd)
    if argv is not None:
        args = build_parser().parse_args(argv)
        if args.command in ("adapt", "tune"):
            config = args.config if args.config and os.path.exists(ROOT / args.config) else (args.config and EXAMPLE)
            load_config(str(ROOT / config) if config and config != EXAMPLE else config, args.overrides)
        return
    words = shlex.split(cmd)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before a command
        words = words[1:]
    if words[:3] == ["python", "-m", "coin_ray.serve"]:
        from coin_ray.serve import _parse_args

        _parse_args(words[3:])
    elif words[0] in ("python", ".venv/bin/python") and words[1].startswith("benchmarks/"):
        parse_only(words[1], words[2:])
    elif words[0].startswith("./scripts/"):
        script = ROOT / words[0]
        assert os.access(script, os.X_OK), f"{script} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
    elif words[:2] == ["source", ".venv/bin/activate"]:
        assert ".venv" in (ROOT / "scripts" / "setup").read_text()
    elif words[0] == "export":
        assert all(re.fullmatch(r"[A-Z_]+=\S*", w) for w in words[1:])
    elif words[0] == "tensorboard":  # a dependency: its command comes with the install
        assert importlib.util.find_spec("tensorboard") is not None and words[1:2] == ["--logdir"]
    else:
        assert tuple(words[:2]) in RAY_SUBCOMMANDS, f"documented command of an unknown kind: {cmd}"


def test_readme_has_commands_of_every_way_to_run_it():
    cmds = [c for c, _ in readme_commands()]
    assert any(c.startswith("coin-ray config") for c in cmds)
    assert any(c.startswith("ray job submit --working-dir .") for c in cmds)
    assert any("jobs/tune.py" in c for c in cmds)
    assert "source .venv/bin/activate" in cmds
    assert tiny_try_command() in cmds  # run by conftest.tiny_try, checked in test_console.py


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_links_between_pages_resolve():
    assert [doc_name(p) for p in DOCS[:1]] == ["README.md"] and len(DOCS) > 1
    for page in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            linked = (page.parent / target) if target else page
            assert linked.exists(), f"{doc_name(page)} links to a missing {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in heading_anchors(linked), f"{doc_name(page)} links to a missing #{anchor} in {target}"


@pytest.mark.parametrize("cmd", on_every_page(lambda p: [(c,) for c, _ in doc_commands(p) if not is_cheap(c)]))
def test_readme_command_parses(cmd):
    check_parses(cmd)


@pytest.mark.parametrize("yaml_text", [pytest.param(y, id=f"{doc_name(p)}: yaml {i + 1}")
                                       for p in DOCS for i, y in enumerate(doc_blocks(p, "yaml"))])
def test_readme_yaml_loads_as_a_config(yaml_text, tmp_path):
    (tmp_path / "c.yaml").write_text(yaml_text)
    load_config(str(tmp_path / "c.yaml"))


@pytest.mark.timeout(900)
# The README's tiny try is the session's one shared adaptation (conftest.tiny_try), run once and
# checked in test_console.py, beside the tests that read its console (one xdist worker, one run).
@pytest.mark.parametrize("cmd, comment", on_every_page(
    lambda p: [(c, m) for c, m in doc_commands(p) if is_cheap(c) and c != tiny_try_command()]))
def test_readme_command_runs(cmd, comment, shell_env, tmp_path):
    run = run_in_shell(cmd, tmp_path, shell_env)
    proc = run.proc
    expected = re.search(r"\(exit (\d)\)", comment)
    if expected:  # a documented error: its exit code and its one line
        assert proc.returncode == int(expected.group(1)), proc.stderr[-2000:]
        assert proc.stderr.strip() == "error: " + comment.removeprefix("error: ").rsplit(" (exit", 1)[0]
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if "config >" in cmd:
        load_config(str(run.cwd / "my.yaml"))
    if "adapt" in cmd:
        assert "| COIN |" in proc.stdout and (run.cwd / "runs").is_dir()
