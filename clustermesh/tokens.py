"""Consul ACL tokens read from files, as carefully as private keys (a token is a credential).

`read_token_file` refuses a file that others can read (like the key file: 0600), a symlink, a
non-regular file or an oversized one; its messages name the file, never the token. A token is
never put in argv by wiremesh itself: files (`token_file`, `--token-file`,
`CONSUL_HTTP_TOKEN_FILE` as Consul's CLI has it) keep it out of every process listing.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import ConsulError

MAX_TOKEN_BYTES = 4096


class TokenFileError(ConsulError):
    """A token file that cannot be used; the message names the file and why, never its content."""


def read_token_file(path: str | Path) -> str:
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise TokenFileError(f"token file {p}: {e.strerror}") from e
    try:
        st = os.fstat(fd)  # checked and read through the same open file
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"token file {p}: not a regular file")
        if st.st_mode & 0o077:
            raise TokenFileError(f"token file {p}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
                                 "it must be 0600 (chmod 600)")
        if st.st_size > MAX_TOKEN_BYTES:
            raise TokenFileError(f"token file {p}: {st.st_size} bytes is too large for a token")
        raw = os.read(fd, MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise TokenFileError(f"token file {p}: {e.strerror}") from e
    finally:
        os.close(fd)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"token file {p}: not a token (non-ASCII bytes)") from None
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise TokenFileError(f"token file {p}: not a token (empty, or spaces or control characters inside)")
    return token


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
