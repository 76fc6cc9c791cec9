"""Mistakes a user can fix, and the exit code each one ends the command with.

The console command (``coin_ray.cli``) turns these into one line on stderr, without a
traceback (``--debug`` shows it):

    EXIT_FAILED      1  the run itself failed (a bug, a crashed stage): the traceback is kept
    EXIT_BAD_INPUT   2  bad input or setting: a config key, a missing folder or bucket, an empty
                        folder, a cloud URL or Ray address nothing answers
    EXIT_CREDENTIAL  3  a credential missing or refused: unset token variable, refused token

The core raises these only where the user is the one to act; everything else stays an
ordinary exception.
"""

from __future__ import annotations

from typing import TextIO

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CREDENTIAL = 3


class UserError(Exception):
    """Bad input or setting; the message is one line saying what to change."""

    exit_code = EXIT_BAD_INPUT


class CredentialError(UserError):
    """The API token is missing or was refused."""

    exit_code = EXIT_CREDENTIAL


class Unreachable(UserError):
    """Nothing answers at an address the user gave (a cloud URL, a Ray cluster)."""


# Where a last-resort verdict goes (a watchdog ending the process): ``coin_ray.cli`` points
# it at the real stderr while the command's own stderr is sent to stdout.
verdict_stream: TextIO | None = None


def one_line(text: str) -> str:
    """``text`` folded onto one line (messages from libraries may span several)."""
    return " ".join(str(text).split())
