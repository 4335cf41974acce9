"""The lab's security options: `lab up --tls` (HTTPS only, a throwaway CA) and `--acl` (ACLs
with default deny and a least-privilege token per node).

--tls: a CA made for this lab (ECDSA P-256, `cryptography`) signs a certificate for each
cluster's Consul server (its hub address and 127.0.0.1), one client certificate per node and
one for the operator (the lab itself and `lab exec hub`). Consul serves HTTPS only, on 8501
(`ports.http = -1`), and verifies clients' certificates (`verify_incoming_https`); every agent
verifies Consul's certificate against the lab's CA.

--acl: each Consul server starts with ACLs on, default deny, and a master token that only the
lab holds (in its Consul config file and a token file, both 0600). Each node gets its own token
(`clustermesh.acl.ensure_agent_token`: its pod CIDR is leased then, by the operator) in a 0600
file named by its agent.toml (`token_file`), never on a command line.

Files (under the lab's directory, 0700): secrets/ (CA key, master tokens, the operator's
client key), tls/ (CA and server certificates), nodes/NODE/tls and nodes/NODE/consul.token.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wiremesh.clustermesh import ConsulOptions, ensure_agent_token, read_token_file, write_token_file

from .errors import LabError

if TYPE_CHECKING:
    from .lab import Lab, Node

HTTPS_PORT = 8501
VALID = datetime.timedelta(days=30)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cert_path: Path, key_path: Path, name: str) -> None:
    """A self-signed CA certificate (cert_path, 0644) and its key (key_path, 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(key_path, _key_pem(key))
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(_pem(cert))


def issue(ca_cert: Path, ca_key: Path, cert_path: Path, key_path: Path, name: str, *, ips: Sequence[str] = (),
          dns: Sequence[str] = (), server: bool = False) -> None:
    """A certificate for `name` signed by the CA: a server's (its addresses as SANs) or a client's."""
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    assert isinstance(ca_private, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_private.public_key()),
                              critical=False))
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.DNSName(d) for d in dns]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_private, hashes.SHA256())
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(_pem(cert))


# --- the lab's side ------------------------------------------------------------------------
def tls_on(lab: "Lab") -> bool:
    return bool(lab.state.get("tls"))


def acl_on(lab: "Lab") -> bool:
    return bool(lab.state.get("acl"))


def secrets_dir(lab: "Lab") -> Path:
    return lab.dir / "secrets"


def ca_file(lab: "Lab") -> Path:
    return lab.dir / "tls" / "ca.pem"


def master_token_file(lab: "Lab", cluster: str) -> Path:
    return secrets_dir(lab) / f"consul-{cluster}.token"


def prepare(lab: "Lab") -> None:
    """Before any Consul starts: the CA and the operator's client certificate (--tls), and a
    master token per cluster (--acl)."""
    if acl_on(lab) and len(lab.state["clusters"]) > 1:
        raise LabError("--acl: one cluster only (federated reads need ACL token replication between datacenters)")
    secrets_dir(lab).mkdir(mode=0o700, exist_ok=True)
    if tls_on(lab):
        make_ca(ca_file(lab), secrets_dir(lab) / "ca-key.pem", f"wiremesh lab {lab.name} CA")
        issue(ca_file(lab), secrets_dir(lab) / "ca-key.pem", secrets_dir(lab) / "operator.pem",
              secrets_dir(lab) / "operator-key.pem", "operator")
    if acl_on(lab):
        for c in lab.state["clusters"]:
            write_token_file(master_token_file(lab, c["name"]), str(uuid.uuid4()))


def server_config(lab: "Lab", c: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """What cluster `c`'s Consul server config adds: (TLS settings, the ACL master token or None)."""
    extra: dict[str, Any] = {}
    if tls_on(lab):
        cert, key = lab.dir / "tls" / f"consul-{c['name']}.pem", secrets_dir(lab) / f"consul-{c['name']}-key.pem"
        issue(ca_file(lab), secrets_dir(lab) / "ca-key.pem", cert, key, f"server.{c['datacenter']}.consul",
              ips=[c["hub_ip"], "127.0.0.1"], dns=[f"server.{c['datacenter']}.consul", "localhost"], server=True)
        extra = {"ports": {"http": -1, "https": HTTPS_PORT, "dns": -1, "grpc": -1},
                 "ca_file": str(ca_file(lab)), "cert_file": str(cert), "key_file": str(key),
                 "verify_incoming_https": True, "verify_incoming_rpc": False, "verify_outgoing": False}
    master = read_token_file(master_token_file(lab, c["name"])) if acl_on(lab) else None
    return extra, master


def address(lab: "Lab", hub_ip: str, http_port: int) -> str:
    return f"https://{hub_ip}:{HTTPS_PORT}" if tls_on(lab) else f"http://{hub_ip}:{http_port}"


def operator_options(lab: "Lab", cluster: str, address: str, timeout: float) -> ConsulOptions:
    """How the lab itself reaches a cluster's Consul: the master token, the operator's certificate."""
    tls = tls_on(lab)
    return ConsulOptions(address=address, timeout=timeout,
                         token=read_token_file(master_token_file(lab, cluster)) if acl_on(lab) else None,
                         ca_file=str(ca_file(lab)) if tls else None,
                         client_cert=str(secrets_dir(lab) / "operator.pem") if tls else None,
                         client_key=str(secrets_dir(lab) / "operator-key.pem") if tls else None)


def node_files(lab: "Lab", node: "Node") -> None:
    """The node's client certificate (--tls) and its own ACL token (--acl), made by the operator."""
    d = Path(node.dir)
    if tls_on(lab):
        issue(ca_file(lab), secrets_dir(lab) / "ca-key.pem", d / "tls" / "client.pem", d / "tls" / "client-key.pem",
              node.name)
    if acl_on(lab):
        cluster = node.cluster or lab.clusters[0]
        tok = lab.consul(lambda s: ensure_agent_token(s, cluster, node.name), cluster)
        write_token_file(d / "consul.token", tok.secret_id)


def agent_toml(lab: "Lab", node: "Node") -> str:
    """The lines of the node's [consul] table beyond its address."""
    d = Path(node.dir)
    lines = []
    if tls_on(lab):
        lines += [f'ca_file = "{ca_file(lab)}"', f'client_cert = "{d / "tls" / "client.pem"}"',
                  f'client_key = "{d / "tls" / "client-key.pem"}"']
    if acl_on(lab):
        lines += [f'token_file = "{d / "consul.token"}"', f'session_node = "{node.name}"']
    return "".join(line + "\n" for line in lines)


def env(lab: "Lab", node: "Node | None", cluster: str) -> list[str]:
    """Environment of a command run in a node (its own token and certificate) or a hub (the
    operator's): files only, the way Consul's CLI takes them."""
    out = [] if node or not tls_on(lab) else [f"CONSUL_HTTP_ADDR={lab.consul_address(cluster)}"]
    if tls_on(lab):
        cert, key = ((Path(node.dir) / "tls" / "client.pem", Path(node.dir) / "tls" / "client-key.pem") if node else
                     (secrets_dir(lab) / "operator.pem", secrets_dir(lab) / "operator-key.pem"))
        out += [f"CONSUL_CACERT={ca_file(lab)}", f"CONSUL_CLIENT_CERT={cert}", f"CONSUL_CLIENT_KEY={key}"]
    if acl_on(lab):
        token = Path(node.dir) / "consul.token" if node else master_token_file(lab, cluster)
        out.append(f"CONSUL_HTTP_TOKEN_FILE={token}")
    return out
