"""The one place where a failed Consul call becomes a `ConsulError`.

The HTTP status decides, and Consul's body only where the status alone does not: Consul 1.8
answers 500 both for "try again" (no leader, an RPC to a server that went away, no path to a
remote datacenter) and for "never" (a session TTL out of range, an invalid policy name), and
403 both for a denied permission and for an unknown token. Callers test `reason` and `status`;
the message is for people.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import requests

from .errors import (
    UNAVAILABLE_REASONS,
    ConsulError,
    ConsulReason,
    ConsulUnavailable,
    SessionExpired,
    TransactionFailed,
    TxnOpError,
)

R = ConsulReason

# 500 bodies that mean "Consul cannot answer now", as Consul 1.8 words them. Checked after the
# refusals below, so "rpc error making call: Permission denied" stays a refusal.
_TRANSIENT_500 = ("rpc error", "leadership lost", "timed out enqueuing operation", "raft is already shutdown",
                  "i/o timeout", "connection refused", "connection reset", "EOF")

_HINTS = {
    R.PERMISSION_DENIED: "the Consul token (--token-file, CONSUL_HTTP_TOKEN_FILE, consul.token_file) lacks the "
                         "ACL rights for this",
    R.ACL_NOT_FOUND: "this Consul does not know the token: check --token-file / CONSUL_HTTP_TOKEN_FILE",
    R.NO_LEADER: "Consul's servers have no leader yet: wait for the election, or start enough servers",
    R.NO_PATH_TO_DC: "is the datacenter's name right, and is it joined over the WAN (consul members -wan)?",
    R.TLS: "give the CA that signed Consul's certificate (--ca-file, CONSUL_CACERT, consul.ca_file), and a client "
           "certificate if Consul verifies clients (--client-cert/--client-key); check the address's scheme",
}


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer from Consul, as received."""

    status: int
    body: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)


def consul_error(what: str, failure: Reply | BaseException, address: str = "") -> ConsulError:
    """The error for `what` (a short description of the call) that failed with `failure`:
    Consul's answer (status >= 400, or a 2xx this client could not read) or the exception of the
    HTTP layer. Raise it `from` the original exception so that the cause is kept."""
    at = f"Consul at {address}" if address else "Consul"
    status: int | None = None
    txn_errors: tuple[TxnOpError, ...] | None = None
    if isinstance(failure, BaseException):
        if isinstance(failure, requests.exceptions.SSLError):
            reason, text = R.TLS, _tls_text(failure, at)
        elif isinstance(failure, requests.Timeout):  # ConnectTimeout included
            reason, text = R.TIMEOUT, f"{at} timed out"
        elif isinstance(failure, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
            reason, text = R.UNREACHABLE, f"{at} unreachable"
        elif isinstance(failure, requests.RequestException):  # a bad URL, too many redirects, ...
            reason, text = R.OTHER, f"{at}: {_first_line(failure)}"
        elif isinstance(failure, (ValueError, KeyError, TypeError, AttributeError, RecursionError)):
            reason, text = R.BAD_RESPONSE, f"unreadable answer from {at} ({_first_line(failure)})"
        else:
            reason, text = R.OTHER, f"{at}: {_first_line(failure)}"
    else:
        status, body = failure.status, failure.body.strip()
        if 200 <= status < 300:
            reason, text = R.BAD_RESPONSE, f"unreadable answer from {at}: {body[:120]!r}"
        elif status == 400:
            reason, text = R.BAD_REQUEST, f"refused by Consul: {body[:200]}"
        elif status == 401:
            reason, text = R.ACL_DISABLED, "ACLs are not enabled on this Consul"
        elif status == 403 and "ACL not found" in body:
            reason, text = R.ACL_NOT_FOUND, "ACL not found (the token, or the policy or token asked for)"
        elif status == 403:
            reason, text = R.PERMISSION_DENIED, "permission denied by Consul ACLs"
        elif status == 404:
            reason, text = R.NOT_FOUND, "not found"
        elif status in (409, 412):
            txn_errors = _txn_errors(body)
            denied = any("Permission denied" in e.what for e in txn_errors or ())
            reason = R.PERMISSION_DENIED if denied else R.CONFLICT
            detail = "; ".join(f"op {e.op_index}: {e.what}" for e in txn_errors) if txn_errors else body[:200]
            text = f"{'permission denied by Consul ACLs' if denied else 'conflict'} ({detail[:300]})"
        elif status == 413:
            reason, text = R.TOO_LARGE, f"too large for Consul: {body[:200]}"
        elif status == 429:
            reason, text = R.UNAVAILABLE, f"{at} is rate-limiting this client"
        elif status in (502, 503, 504):
            reason, text = R.UNAVAILABLE, f"{at} not available (HTTP {status}{': ' + body[:80] if body else ''})"
        elif status == 500:
            reason = _reason_of_500(body)
            text = {R.NO_LEADER: "Consul has no cluster leader yet",
                    R.NO_PATH_TO_DC: "Consul has no path to the datacenter asked for",
                    R.PERMISSION_DENIED: "permission denied by Consul ACLs",
                    R.ACL_NOT_FOUND: "ACL not found (the token, or the policy or token asked for)",
                    R.UNAVAILABLE: f"{at} not ready ({body[:80]})"}.get(reason, f"refused by Consul: {body[:200]}")
        else:
            reason, text = R.OTHER, f"HTTP {status} from {at}: {body[:200]}"
    message = f"{what}: {text}"
    error: ConsulError
    if txn_errors:
        error = TransactionFailed(message, txn_errors, status, reason)
    elif reason in UNAVAILABLE_REASONS:
        error = ConsulUnavailable(message, status, reason)
    elif reason is R.INVALID_SESSION:
        error = SessionExpired(message, status, reason)
    else:
        error = ConsulError(message, status, reason)
    if reason in _HINTS:
        error.hint = _HINTS[reason]
    return error


def _reason_of_500(body: str) -> ConsulReason:
    if "No cluster leader" in body:
        return R.NO_LEADER
    if "No path to datacenter" in body:
        return R.NO_PATH_TO_DC
    if "Permission denied" in body:
        return R.PERMISSION_DENIED
    if "ACL not found" in body:
        return R.ACL_NOT_FOUND
    if "Session TTL" in body:  # "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"
        return R.SESSION_TTL
    if "invalid session" in body:  # acquire or release with a session Consul no longer has
        return R.INVALID_SESSION
    if body.startswith(("Unknown check", "Unknown service")):
        return R.NOT_FOUND
    if any(t in body for t in _TRANSIENT_500):
        return R.UNAVAILABLE
    return R.BAD_REQUEST  # a validation message: "Invalid Policy: ...", "No such ACL policy ..."


def _txn_errors(body: str) -> tuple[TxnOpError, ...] | None:
    """The `Errors` of a rolled-back transaction, or None if the body is not one."""
    try:
        errors = json.loads(body).get("Errors")
        return tuple(TxnOpError(int(e.get("OpIndex", 0)), str(e.get("What", ""))) for e in errors) or None
    except (ValueError, AttributeError, TypeError):
        return None


def _tls_text(e: BaseException, at: str) -> str:
    """One line for a failed TLS handshake: an untrusted certificate says so, with the check that
    failed (requests buries it three exceptions deep in a line of retry noise)."""
    full = str(e)
    verify = re.search(r"certificate verify failed: ([^(')\]]+)", full)
    if verify:
        return f"the certificate of {at} is not trusted ({verify.group(1).strip()})"
    if re.search(r"certificate required|bad certificate|unknown ca|handshake failure", full, re.I):
        return f"{at} refused this client's certificate (or that it sent none)"
    if "WRONG_VERSION_NUMBER" in full or "wrong version number" in full:
        return f"TLS with {at} failed: it does not speak HTTPS on that port"
    return f"TLS with {at} failed ({_first_line(e)})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:160]


__all__ = ["Reply", "consul_error"]
