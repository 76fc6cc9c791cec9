"""One JSON-over-HTTP request with every failure turned into a typed ``CloudError``.

Shared by the ``http`` and ``dds`` backends so that both classify failures the same way:
2xx with a JSON body -> the parsed body; 401/403 -> AuthError; 408, 429 and 5xx,
timeouts, refused connections and unparsable bodies -> TransientError (429 carries the
Retry-After hint); any other status -> PermanentError.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime
from typing import Any

from coin_ray.cloud.errors import AuthError, PermanentError, Secret, TransientError


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header, in either form RFC 9110 allows.

    ``"120"`` (delay-seconds; decimals accepted) or an HTTP-date such as
    ``"Wed, 21 Oct 2026 07:28:00 GMT"`` (seconds from ``now``, epoch seconds, default the
    clock). Never negative; None when absent or unreadable.
    """
    if not value or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is read the same way
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _scrub(text: str, token: Secret | None) -> str:
    if token and token.reveal():
        text = text.replace(token.reveal(), "***")
    return text[:200]


def request_json(method: str, url: str, body: dict | None, headers: dict[str, str],
                 timeout_s: float, token: Secret | None = None) -> Any:
    """Send one request and return the decoded JSON body.

    ``token`` is only used to scrub it out of error details (the caller puts it in ``headers``).

    Raises:
        AuthError, TransientError, PermanentError (see the module docstring).
    """
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        _raise_for_status(err, token)
    except (TimeoutError, socket.timeout):
        raise TransientError("timeout", f"no answer within {timeout_s:g} s") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (TimeoutError, socket.timeout)):
            raise TransientError("timeout", f"no answer within {timeout_s:g} s") from None
        raise TransientError("connection", _scrub(str(err.reason), token)) from None
    except (ConnectionError, OSError) as err:  # reset or closed mid-body
        raise TransientError("connection", _scrub(str(err), token)) from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise TransientError("malformed body", f"{len(raw)} bytes that are not JSON") from None


def _raise_for_status(err: urllib.error.HTTPError, token: Secret | None) -> None:
    code = err.code
    try:
        text = err.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    detail = _scrub(text, token)
    body = _json_or_none(text.replace(token.reveal(), "***") if token and token.reveal() else text)
    if code in (401, 403):
        raise AuthError(f"http {code}", detail) from None
    if code == 429:
        retry_after = parse_retry_after(err.headers.get("Retry-After"))
        raise TransientError("http 429", detail, retry_after=retry_after) from None
    if code == 408 or code >= 500:
        raise TransientError(f"http {code}", detail) from None
    raise PermanentError(f"http {code}", detail, body=body) from None


def _json_or_none(text: str) -> Any:
    """The parsed JSON of an error body (whole, not cut to the detail's length), or None."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
