"""What a parser's answer must look like, whatever it was given: the checks every target shares."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from wiremesh.clustermesh import InvalidRecord

# The product's rule for a field that holds a private key (clustermesh.records refuses such records).
PRIVATE_NAME = re.compile(r"private[_-]?key|privkey", re.IGNORECASE)
KEY_FIELDS = ("public_key", "next_public_key")  # where an operator may paste a private key by mistake
# A message showing this much of a secret shows the secret.
WINDOW = 16


class Bug(AssertionError):
    """A parser broke its contract: another exception escaped, or its error or result is wrong."""


def no_leak(message: str, secrets: Iterable[str], public: str) -> None:
    """No WINDOW characters of any secret in `message`, unless the input also had them in the open
    (as they are, or as repr() shows them: "\\x00" + "405..." holds "0405...")."""
    shown = repr(public)
    for s in secrets:
        for i in range(len(s) - WINDOW + 1):
            w = s[i:i + WINDOW]
            if w in message and w not in public and w not in shown:
                raise Bug(f"a secret of the input shows in the message: {message[:300]!r}")


def split_secrets(doc: Any, names: tuple[str, ...] = KEY_FIELDS) -> tuple[list[str], str]:
    """A JSON-ish document's strings -> (those under secret fields, all the others joined).

    A secret field: a private-key name anywhere, or one of `names` (by default the public-key
    fields, where an operator may paste a private key by mistake)."""
    secrets: list[str] = []
    public: list[str] = []
    stack: list[tuple[Any, bool]] = [(doc, False)]  # no recursion: a document may nest deeper than Python
    while stack:
        v, secret = stack.pop()
        if isinstance(v, str):
            (secrets if secret else public).append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                public.append(str(k))
                stack.append((x, secret or (isinstance(k, str) and (bool(PRIVATE_NAME.search(k)) or k in names))))
        elif isinstance(v, list):
            stack.extend((x, secret) for x in v)
    return secrets, "\n".join(public)


def loads_or_none(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def names_in(doc: Any) -> set[str]:
    """Every mapping key anywhere in `doc` (a parser may name an unknown field it was given)."""
    out: set[str] = set()
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            out.update(str(k) for k in v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return out


def check_invalid_record(e: InvalidRecord, key: str, known: frozenset[str], doc: Any) -> None:
    """An InvalidRecord names a field of the record (or the envelope) and says why, after the key."""
    if not isinstance(e.field, str) or not e.field.strip() or not isinstance(e.reason, str) or not e.reason:
        raise Bug(f"InvalidRecord without a field or reason: {e!r}")
    if not str(e).startswith(f"{key}: {e.field}: "):
        raise Bug(f"InvalidRecord does not start with its key and field: {str(e)[:200]!r}")
    head = re.split(r"[.\[]", e.field, maxsplit=1)[0]
    given = {n[:64] for n in names_in(doc)} | {n[:32] for n in names_in(doc)}
    if head not in known | {"value", "schema", "extra", "key", "port", "target_port", "protocol"} and \
            e.field not in given and head not in given:
        raise Bug(f"InvalidRecord names {e.field!r}, neither a field of the record nor one it was given")
    if "unexpected validation error" in e.reason:
        raise Bug(f"a validator raised something else than InvalidRecord: {e}")
    secrets, public = split_secrets(doc)
    no_leak(str(e), secrets, public + key)
