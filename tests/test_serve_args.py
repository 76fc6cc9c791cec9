"""coin-ray serve / python -m coin_ray.serve: a bad checkpoint is one line and exit 2, and the
help names the command it was started as and explains every option."""

from __future__ import annotations

import pytest

from coin_ray.errors import EXIT_BAD_INPUT
from coin_ray.serve import build_parser, main


def test_a_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit) as err:
        main(["--backend", "foggy-shapes", "--checkpoint", str(missing)], prog="coin-ray serve")
    lines = capsys.readouterr().err.splitlines()
    assert err.value.code == EXIT_BAD_INPUT and len(lines) == 1
    assert lines[0].startswith(f"error: coin-ray serve: --checkpoint {missing}: no such file")


def test_a_file_that_is_no_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as err:
        main(["--backend", "foggy-shapes", "--checkpoint", str(bad), "--port", "0"])
    lines = capsys.readouterr().err.splitlines()
    assert err.value.code == EXIT_BAD_INPUT and len(lines) == 1
    assert f"--checkpoint {bad}: not a foggy-shapes stand-in checkpoint" in lines[0]


def test_help_names_the_command_and_every_option_has_help(capsys):
    parser = build_parser("coin-ray serve")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert capsys.readouterr().out.startswith("usage: coin-ray serve")
    assert [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help] == []
