"""Consul ACL tokens read from files, as carefully as private keys (a token is a credential).

`read_token_file` refuses a file that others can read (like the key file: 0600), a symlink, a
non-regular file or an oversized one; its messages name the file, never the token. A token is
never put in argv by wiremesh itself: files (`token_file`, `--token-file`,
`CONSUL_HTTP_TOKEN_FILE` as Consul's CLI has it) keep it out of every process listing.

Every token, whatever its source (--token, CONSUL_HTTP_TOKEN, agent.toml, an answers file of
`wiremesh setup`, a token file, a prompt), passes `check_token` before it is used: printable ASCII,
no whitespace, at most MAX_TOKEN_LEN characters. Refusals name the source and the reason only.
"""

from __future__ import annotations

import os
import shlex
import stat
import tempfile
from pathlib import Path

from .errors import ClusterMeshError

MAX_TOKEN_BYTES = 4096  # a token file's size (a token and its newline, or a stray blank line or two)
MAX_TOKEN_LEN = 512  # Consul's tokens are UUIDs (36 characters); a configured master token may be longer


class InvalidToken(ClusterMeshError):
    """A Consul ACL token that cannot be used. The message names where it came from (`source`:
    --token, CONSUL_HTTP_TOKEN, a file, a field) and why (`reason`), never the token."""

    def __init__(self, source: str, reason: str, hint: str | None = None) -> None:
        self.source, self.reason = source, reason
        self.hint = hint or ("a Consul token is printable ASCII without spaces (a UUID, or the secret ID "
                             "`consul acl token create` printed)")
        super().__init__(f"{source}: {reason}")


class TokenFileError(InvalidToken):
    """A token file that cannot be used; the message names the file and why, never its content."""


def check_token(token: str, source: str) -> str:
    """`token` if Consul can take it: 1-512 characters of printable ASCII, no whitespace.

    Consul 1.8 takes any such string (UUID secret IDs, a master token of the operator's choosing);
    what it cannot take in an HTTP header, a control character, a space or a newline, is refused
    here, naming only `source` and the kind of character (a token is a credential)."""
    if not isinstance(token, str):
        raise InvalidToken(source, f"must be text, not {type(token).__name__}")
    if not token:
        raise InvalidToken(source, "is empty")
    if len(token) > MAX_TOKEN_LEN:
        raise InvalidToken(source, f"is {len(token)} characters long; a Consul token has at most {MAX_TOKEN_LEN}")
    for i, ch in enumerate(token):
        if "!" <= ch <= "~":
            continue
        if ch in "\r\n":
            where = "ends with a line break" if not token[i:].strip() else "holds a line break"
        elif ch.isspace():
            around = token.strip() != token
            where = f"{'has' if around else 'holds'} whitespace{' around it' if around else ''} (a space or a tab)"
        elif ch.isprintable():
            where = "holds a non-ASCII character"
        else:
            where = "holds a control character"
        raise InvalidToken(source, f"{where} at position {i + 1} of {len(token)}; it would not reach Consul intact")
    return token


def read_token_file(path: str | Path) -> str:
    p = Path(path)
    src = f"token file {p}"
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise TokenFileError(src, e.strerror or str(e), "give a readable regular file (not a symlink)") from e
    try:
        st = os.fstat(fd)  # checked and read through the same open file
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(src, "not a regular file")
        check_private(st.st_mode, src, p)
        if st.st_size > MAX_TOKEN_BYTES:
            raise TokenFileError(src, f"{st.st_size} bytes is too large for a token")
        raw = os.read(fd, MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise TokenFileError(src, e.strerror or str(e)) from e
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise TokenFileError(src, "not a token (non-ASCII bytes)") from None
    token = text.strip()  # the file's own line break, and blank lines around the token
    try:
        return check_token(token, src)
    except InvalidToken as e:
        raise TokenFileError(src, f"not a token ({e.reason})") from None


def check_private(mode: int, source: str, path: str | Path) -> None:
    """Refuse a file holding a token (`source` names it) that its group or others may read or write."""
    if mode & 0o077:
        raise TokenFileError(source, f"mode {stat.S_IMODE(mode):04o} lets others read it; a file holding a token "
                                   "must be 0600", f"chmod 600 {shlex.quote(str(path))}")


def write_token_file(path: str | Path, token: str) -> None:
    """Write `token` to `path` (0600 from the first byte, atomically; a symlink there is replaced,
    never written through); its directory is made 0700 if missing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
