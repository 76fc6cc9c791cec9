"""What can go wrong when calling a cloud detector, and the token that must never leak.

Backends raise exactly one of these; the retry loop decides what to do from the type:
    TransientError  429, 5xx, timeouts, malformed bodies, "try again" codes -> retry with backoff
    PermanentError  the request itself is wrong (HTTP 400, image too large) -> error record now
    AuthError       401/403 -> stop the whole run, naming the backend and the token's env var
    UnknownCategories (a PermanentError) the detector cannot answer some prompts -> stop the run
    TaskFailed      (a PermanentError) a task-based service says the task failed
    TaskGone        a task-based service no longer knows the task -> create it again
"""

from __future__ import annotations

import os
from typing import Any

UNKNOWN_CATEGORIES = "unknown categories"  # the reason of UnknownCategories and of the run's stop line


class CloudError(Exception):
    """Base class; ``reason`` is a short machine-friendly tag ("http 500", "timeout", ...);
    ``body`` the service's parsed JSON error body, when it sent one (token scrubbed)."""

    def __init__(self, reason: str, detail: str = "", body: Any = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.body = body


class TransientError(CloudError):
    """Worth retrying; ``retry_after`` (seconds) is the server's hint, when it gave one."""

    def __init__(self, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after


class PermanentError(CloudError):
    """Retrying the same request cannot help; the image gets an error record."""


class UnknownCategories(PermanentError):
    """A closed-vocabulary detector (the Foggy-Shapes stand-in) does not know some of the
    run's prompts. The same for every image: the run stops in one line naming them."""

    def __init__(self, unknown: list[str], known: list[str] | None, where: str) -> None:
        self.unknown, self.known = list(unknown), list(known or [])
        knows = f" (it knows: {', '.join(self.known)})" if self.known else ""
        super().__init__(UNKNOWN_CATEGORIES, f"the detector at {where} cannot answer "
                         f"{', '.join(repr(u) for u in self.unknown)}{knows}; drop them from "
                         "data.categories, name them with cloud.prompts, or serve a detector that knows them")


class AuthError(CloudError):
    """The credentials were refused; the run must stop."""


class TaskFailed(PermanentError):
    """The service ran the task and it failed: remembered, not paid for again on a re-run."""


class TaskGone(CloudError):
    """The service no longer knows the task (expired or never kept): it must be created again."""


class Secret:
    """A token that prints as '***' everywhere (repr, str, f-strings, tracebacks).

    It still pickles with its value, so Ray can hand it to the actors that call the API.
    """

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The real value; call it only where a request header is built."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def auth_message(backend: str, token_env: str) -> str:
    """The one message a refused token produces (never the token itself)."""
    where = (f"the environment variable {token_env}" if token_env
             else "cloud.token_env (not set: name the environment variable holding the token)")
    return f"backend {backend!r} refused the credentials; check the API token in {where}"


def read_token(token_env: str, backend: str, required: bool) -> Secret:
    """Read the token from the environment variable *named* by ``token_env``.

    Raises:
        AuthError: ``required`` and the variable is unset or empty (before any call is paid for).
    """
    value = os.environ.get(token_env, "") if token_env else ""
    if required and not value:
        raise AuthError("no token", f"backend {backend!r} needs an API token in the environment "
                        f"variable named by cloud.token_env ({token_env or 'unset'}), which is empty")
    return Secret(value)
