"""agent.toml: what one node's agent needs to know, strictly validated.

Example::

    node = "node1"
    cluster = "lab"
    underlay_address = "192.0.2.11"     # the address peers send WireGuard UDP to
    listen_port = 51820                 # default: the cluster's wg_port
    interface = "wm0"
    key_file = "/var/lib/wiremesh/private.key"
    identity_key_file = ""              # the node's Ed25519 identity key (signs its records);
                                        # default: identity.key beside key_file
    certificate_file = ""               # its certificate (wiremesh node enroll); default: node.crt
                                        # beside key_file; absent there: records go unsigned
    cluster_signing_key = ""            # the cluster's signing public key (base64), pinned: only
                                        # signing settings it signed are taken from Consul
    cluster_key_file = ""               # or a file holding it (wiremesh node enroll writes it);
                                        # default: cluster.pub beside key_file, optional there
    backend = "auto"                    # auto | kernel | userspace
    state_dir = "/var/lib/wiremesh"
    health_address = "127.0.0.1:9477"   # /healthz and /metrics; "" turns it off
    session_ttl = 20                    # seconds after a crash until peers drop this node (+ a
                                        # hold of min(session_ttl, 5 s): agent.departures)
                                        # (Consul is asked for half: it waits up to twice its
                                        # TTL; a server's default session_ttl_min of 10s makes
                                        # 20 the least it can honour)
    persistent_keepalive = 0
    service_cgroup = "/sys/fs/cgroup/unified/pods"   # global services' eBPF lookup applies to the
                                        # processes of this cgroup v2 group (and below); "" = off
    bpf_pin_dir = ""                    # default /sys/fs/bpf/wiremesh/<cluster>-<node>

    [consul]
    address = "http://127.0.0.1:8500"   # https://HOST:8501 for TLS
    token_file = ""                     # a 0600 file holding the ACL token (or token = "...")
    ca_file = ""                        # CA bundle that signed Consul's certificate (HTTPS)
    client_cert = ""                    # with client_key: for a Consul that verifies clients
    client_key = ""
    session_node = ""                   # Consul node of the agent's session ("": the Consul agent
                                        # it talks to); per-node ACL tokens allow only its own name
    datacenter = ""

Environment variables stand in for fields left out, as for Consul's CLI: CONSUL_HTTP_ADDR,
CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_TOKEN, CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wiremesh.clustermesh import (ConsulOptions, InvalidRecord, InvalidToken, TokenFileError, check_cluster_name,
                                  check_node_name, check_private, check_token, read_token_file)
from wiremesh.keys import KeyMaterialError, VerifyKey
from wiremesh.tunnels import BACKENDS

from .errors import ConfigError

MAX_CONFIG_BYTES = 1024 * 1024
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    cluster: str
    underlay_address: str
    listen_port: int | None = None
    interface: str = "wm0"
    key_file: Path = Path("/var/lib/wiremesh/private.key")
    backend: str = "auto"
    state_dir: Path = Path("/var/lib/wiremesh")
    health_address: str = "127.0.0.1:9477"
    session_ttl: int = 20
    persistent_keepalive: int = 0
    resync_interval: float = 30.0
    consul: ConsulOptions = field(default_factory=ConsulOptions)
    service_cgroup: Path | None = None  # None: no service lookup on this node
    bpf_pin_dir: Path | None = None
    identity_key_file: Path | None = None  # None: identity.key beside key_file
    certificate_file: Path | None = None  # None: node.crt beside key_file (optional there)
    cluster_signing_key: str = ""  # base64; "": from cluster_key_file
    cluster_key_file: Path | None = None  # None: cluster.pub beside key_file (optional there)

    @property
    def identity_key_path(self) -> Path:
        return self.identity_key_file or self.key_file.parent / "identity.key"

    @property
    def certificate_path(self) -> Path:
        return self.certificate_file or self.key_file.parent / "node.crt"

    @property
    def cluster_key_path(self) -> Path:
        return self.cluster_key_file or self.key_file.parent / "cluster.pub"

    @property
    def pin_dir(self) -> Path:
        """Where this node's eBPF programs, links and maps are pinned (one directory per agent)."""
        return self.bpf_pin_dir or Path("/sys/fs/bpf/wiremesh") / f"{self.cluster}-{self.node}"

    @property
    def health_bind(self) -> tuple[str, int] | None:
        if not self.health_address:
            return None
        host, _, port = self.health_address.rpartition(":")
        return host.strip("[]"), int(port)


_TOP = {
    "node", "cluster", "underlay_address", "listen_port", "interface", "key_file", "backend",
    "state_dir", "health_address", "session_ttl", "persistent_keepalive", "resync_interval", "consul",
    "service_cgroup", "bpf_pin_dir", "identity_key_file", "certificate_file", "cluster_signing_key", "cluster_key_file",
}
_CONSUL = {"address", "token", "token_file", "ca_file", "client_cert", "client_key", "session_node", "datacenter"}
_CONSUL_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _typed(src: str, d: dict[str, Any], name: str, typ: type, prefix: str = "") -> Any:
    v = d[name]
    ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        if abs(v) > 2**53:  # TOML integers are not bounded by the parser; float() raises past 1e308
            raise ConfigError(src, prefix + name, f"{str(v)[:24]} is out of range")
        ok, v = True, float(v)
    if not ok:
        raise ConfigError(src, prefix + name, f"must be {typ.__name__}, not {type(v).__name__}")
    if typ is str and "\x00" in v:  # every string here is a name, an address or a path: none holds NUL
        raise ConfigError(src, prefix + name, "must not contain a NUL character")
    return v


def parse_config(data: dict[str, Any], src: str = "agent.toml") -> AgentConfig:
    """Validate a parsed TOML document (pure; no file or network access)."""
    for name in sorted(set(data) - _TOP):
        raise ConfigError(src, name, "unknown field")
    for name in ("node", "cluster", "underlay_address"):
        if name not in data:
            raise ConfigError(src, name, "is required")
    kw: dict[str, Any] = {}
    types: dict[str, type] = {
        "node": str, "cluster": str, "underlay_address": str, "listen_port": int, "interface": str,
        "key_file": str, "backend": str, "state_dir": str, "health_address": str, "session_ttl": int,
        "persistent_keepalive": int, "resync_interval": float, "service_cgroup": str, "bpf_pin_dir": str,
        "identity_key_file": str, "certificate_file": str, "cluster_signing_key": str, "cluster_key_file": str,
    }
    for name, typ in types.items():
        if name in data:
            kw[name] = _typed(src, data, name, typ)
    try:
        check_node_name(kw["node"], "node")
        check_cluster_name(kw["cluster"], "cluster")
    except InvalidRecord as e:
        raise ConfigError(src, e.field, e.reason) from None
    try:
        ip = ipaddress.ip_address(kw["underlay_address"])
    except ValueError:
        raise ConfigError(src, "underlay_address", f"{kw['underlay_address']!r} is not an IP address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise ConfigError(src, "underlay_address", f"{ip} cannot receive WireGuard traffic")
    kw["underlay_address"] = str(ip)
    if "listen_port" in kw and not 1 <= kw["listen_port"] <= 65535:
        raise ConfigError(src, "listen_port", f"{kw['listen_port']} is outside 1-65535")
    if "interface" in kw and not _IFNAME.fullmatch(kw["interface"]):
        raise ConfigError(src, "interface", f"{kw['interface']!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
    if "backend" in kw and kw["backend"] not in BACKENDS:
        raise ConfigError(src, "backend", f"{kw['backend']!r} is not one of {', '.join(BACKENDS)}")
    for name in ("identity_key_file", "certificate_file", "cluster_key_file"):
        if name in kw and not kw[name]:
            del kw[name]  # "": the default, beside key_file
    if kw.get("cluster_signing_key"):
        try:
            VerifyKey.from_base64(kw["cluster_signing_key"], "cluster_signing_key")
        except KeyMaterialError as e:
            raise ConfigError(src, "cluster_signing_key", str(e).split(": ", 1)[-1]) from None
    for name in ("key_file", "state_dir", "identity_key_file", "certificate_file", "cluster_key_file"):
        if name in kw:
            if not kw[name]:
                raise ConfigError(src, name, "must not be empty")
            kw[name] = Path(kw[name])
    for name, root in (("service_cgroup", "/sys/fs/cgroup/"), ("bpf_pin_dir", "/sys/fs/bpf/")):
        if name in kw:
            if not kw[name]:
                del kw[name]  # "": off (service_cgroup) or the default (bpf_pin_dir)
                continue
            path = Path(kw[name])
            if not path.is_absolute() or ".." in path.parts or not kw[name].startswith(root):
                raise ConfigError(src, name, f"{kw[name]!r} must be an absolute path under {root}")
            kw[name] = path
    if "health_address" in kw and kw["health_address"]:
        host, sep, port = kw["health_address"].rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            ok = sep and port.isdigit() and 0 <= int(port) <= 65535
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(src, "health_address", f"{kw['health_address']!r} is not IP:port")
    if "session_ttl" in kw and not 2 <= kw["session_ttl"] <= 86400:
        raise ConfigError(src, "session_ttl", f"{kw['session_ttl']} is outside 2-86400")
    if "persistent_keepalive" in kw and not 0 <= kw["persistent_keepalive"] <= 65535:
        raise ConfigError(src, "persistent_keepalive", f"{kw['persistent_keepalive']} is outside 0-65535")
    if "resync_interval" in kw and not 1 <= kw["resync_interval"] <= 3600:
        raise ConfigError(src, "resync_interval", f"{kw['resync_interval']} is outside 1-3600")
    kw["consul"] = _parse_consul(data.get("consul", {}), src)
    return AgentConfig(**kw)


def _parse_consul(d: Any, src: str) -> ConsulOptions:
    if not isinstance(d, dict):
        raise ConfigError(src, "consul", "must be a table")
    for name in sorted(set(d) - _CONSUL):
        raise ConfigError(src, f"consul.{name}", "unknown field")
    for name in d:
        _typed(src, d, name, str, "consul.")
    env = os.environ
    address = d.get("address") or env.get("WIREMESH_CONSUL_HTTP_ADDR") or env.get("CONSUL_HTTP_ADDR") or "http://127.0.0.1:8500"
    token = d.get("token") or None
    if d.get("token") and d.get("token_file"):
        raise ConfigError(src, "consul.token_file", "set token or token_file, not both")
    if token:
        _token(token, src, "consul.token", "consul.token")
    token_file = d.get("token_file") or (None if token else env.get("CONSUL_HTTP_TOKEN_FILE"))
    if token_file:
        try:
            token = read_token_file(token_file)  # 0600, like the key file; never echoed
        except TokenFileError as e:
            field_ = "consul.token_file" if d.get("token_file") else "CONSUL_HTTP_TOKEN_FILE"
            raise ConfigError(src, field_, str(e), e.hint) from None
    if not token and env.get("CONSUL_HTTP_TOKEN"):
        token = _token(env["CONSUL_HTTP_TOKEN"], src, "CONSUL_HTTP_TOKEN", "the environment's CONSUL_HTTP_TOKEN")
    files = {name: d.get(name) or env.get(var) or None for name, var in
             (("ca_file", "CONSUL_CACERT"), ("client_cert", "CONSUL_CLIENT_CERT"), ("client_key", "CONSUL_CLIENT_KEY"))}
    for name, path in files.items():
        if path and not Path(path).is_file():
            raise ConfigError(src, f"consul.{name}", f"{path} is not a file")
    if files["client_key"] and not files["client_cert"]:
        raise ConfigError(src, "consul.client_key", "set without client_cert")
    if files["client_key"] and os.stat(files["client_key"]).st_mode & 0o077:
        raise ConfigError(src, "consul.client_key", f"{files['client_key']} lets others read it; it must be 0600")
    session_node = d.get("session_node") or None
    if session_node and not _CONSUL_NODE.fullmatch(session_node):
        raise ConfigError(src, "consul.session_node", f"{session_node[:40]!r} is not a Consul node name "
                          "(1-128 of A-Z a-z 0-9 _ . -, a letter or digit first)")
    opts = ConsulOptions(address=address, token=token, ca_file=files["ca_file"], client_cert=files["client_cert"],
                         client_key=files["client_key"], session_node=session_node,
                         datacenter=d.get("datacenter") or None)
    try:
        opts.parsed()
    except Exception as e:
        raise ConfigError(src, "consul.address", str(e).split(": ", 1)[-1]) from None
    return opts


def _token(token: str, src: str, field_: str, source: str) -> str:
    try:
        return check_token(token, source)
    except InvalidToken as e:
        raise ConfigError(src, field_, e.reason, e.hint) from None


def load_config(path: Path) -> AgentConfig:
    """Read and validate agent.toml; any problem is one ConfigError naming the field."""
    src = str(path)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode  # the file read, not whatever the path names later
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(src, "file", e.strerror or str(e)) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(src, "file", f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not an agent.toml")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(src, "file", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(src, "syntax", str(e)) from None
    except RecursionError:  # arrays or inline tables nested deeper than tomllib goes
        raise ConfigError(src, "syntax", "nested too deeply") from None
    consul = data.get("consul")
    if isinstance(consul, dict) and consul.get("token"):  # a credential in the file: 0600, like a token file
        try:
            check_private(mode, src, path)
        except TokenFileError as e:
            raise ConfigError(src, "consul.token", f"the file holds a token and {e.reason.split('; ')[0]}: "
                              "it must be 0600", e.hint) from None
    return parse_config(data, src)
