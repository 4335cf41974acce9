"""The `wiremesh` CLI through click's CliRunner: exit codes, stdout data, stderr messages."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from wiremesh.cli.main import cli
from wiremesh.keys import PrivateKey, read_key_file, write_key_file


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="wiremesh")


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_clean_failure(result: Result) -> None:
    """Exit 1, exactly one 'error:' line on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == 1, result.output
    assert len(error_lines(result)) == 1, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert isinstance(result.exception, SystemExit)


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [[], ["agent"], ["cluster"], ["cluster", "init"], ["cluster", "show"], ["keys"], ["keys", "generate"],
     ["keys", "public"], ["status"], ["lab"]],
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0(args: list[str], flag: str) -> None:
    result = run(*args, flag)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: wiremesh")


def test_root_help_lists_every_group() -> None:
    out = run("--help").stdout
    for group in ("agent", "cluster", "keys", "status", "lab"):
        assert f"  {group}" in out
    for option in ("--consul", "--token", "--output", "--verbose", "--quiet"):
        assert option in out


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert "wiremesh" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = run("frobnicate")
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.stderr


# --- status against no Consul ---------------------------------------------------------------


def test_status_without_consul_is_one_line_and_a_hint() -> None:
    result = run("--consul", "http://127.0.0.1:1", "status")
    assert_clean_failure(result)
    (line,) = error_lines(result)
    assert "unreachable" in line
    assert any(line.startswith("hint:") and "CONSUL_HTTP_ADDR" in line for line in result.stderr.splitlines())


def test_status_consul_address_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://127.0.0.1:1")
    result = run("status")
    assert_clean_failure(result)
    assert "unreachable" in error_lines(result)[0]


def test_status_with_bad_config_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('node = "n1"\ncluster = "lab"\nunderlay_address = "nope"\n')
    result = run("status", "--config", str(cfg))
    assert_clean_failure(result)
    assert error_lines(result)[0] == f"error: {cfg}: underlay_address: 'nope' is not an IP address"


# --- cluster init -----------------------------------------------------------------------------


def test_cluster_init_bad_name_names_the_argument() -> None:
    result = run("--consul", "http://127.0.0.1:1", "cluster", "init", "bad_Name", "--id", "1",
                 "--pod-cidr", "10.0.0.0/16")
    assert result.exit_code == 2
    assert "Invalid value for NAME" in result.stderr
    assert "'bad_Name' is not a cluster name" in result.stderr
    assert "Traceback" not in result.output
    assert "unreachable" not in result.output  # refused before talking to Consul


@pytest.mark.parametrize(
    "args, option, reason",
    [
        (["--id", "0", "--pod-cidr", "10.0.0.0/16"], "--id", "0 is outside 1-255"),
        (["--id", "1", "--pod-cidr", "10.0.0.1/16"], "--pod-cidr", "is not a network CIDR"),
        (["--id", "1", "--pod-cidr", "10.0.0.0/16", "--mtu", "100"], "--mtu", "100 is outside 1280-9000"),
        (["--id", "1", "--pod-cidr", "10.96.0.0/12"], "--service-cidr", "overlaps pod_cidr"),
    ],
)
def test_cluster_init_bad_option_names_the_option(args: list[str], option: str, reason: str) -> None:
    result = run("--consul", "http://127.0.0.1:1", "cluster", "init", "lab", *args)
    assert result.exit_code == 2
    assert f"Invalid value for {option}: " in result.stderr
    assert reason in result.stderr


def test_cluster_init_requires_id() -> None:
    result = run("cluster", "init", "lab", "--pod-cidr", "10.0.0.0/16")
    assert result.exit_code == 2
    assert "'--id'" in result.stderr


# --- keys -----------------------------------------------------------------------------------


def test_keys_generate_creates_0600_file_and_prints_public_key(tmp_path: Path) -> None:
    path = tmp_path / "wg" / "private.key"
    result = run("keys", "generate", str(path))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key_file(path)
    pub = key.public_key()
    assert pub.base64 in result.stdout
    assert pub.fingerprint in result.stdout
    assert f"created {path}" in result.stderr
    assert key.secret_base64() not in result.output


def test_keys_generate_keeps_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    result = run("keys", "generate", str(path))
    assert result.exit_code == 0
    assert f"kept existing {path}" in result.stderr
    assert key.public_key().base64 in result.stdout
    assert read_key_file(path) == key


def test_keys_public_json(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    result = run("-o", "json", "keys", "public", str(path))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == {"public_key": key.public_key().base64, "fingerprint": key.public_key().fingerprint}
    assert key.secret_base64() not in result.output


def test_keys_generate_json(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    result = run("--output", "json", "keys", "generate", str(path))
    data = json.loads(result.stdout)
    assert data["created"] is True and data["path"] == str(path)
    assert data["public_key"] == read_key_file(path).public_key().base64


def test_keys_public_refuses_world_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = PrivateKey.generate()
    write_key_file(path, key)
    path.chmod(0o644)
    result = run("keys", "public", str(path))
    assert_clean_failure(result)
    assert error_lines(result)[0] == (
        f"error: key file {path}: mode 0644 lets others read it; it must be 0600 (chmod 600)")
    assert key.secret_base64() not in result.output


def test_keys_public_missing_file(tmp_path: Path) -> None:
    result = run("keys", "public", str(tmp_path / "absent.key"))
    assert_clean_failure(result)
    assert "No such file or directory" in error_lines(result)[0]


# --- agent --check ----------------------------------------------------------------------------


def test_agent_check_bad_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('node = "n1"\ncluster = "lab"\nunderlay_address = "192.0.2.11"\ninterface = "this-is-too-long0"\n')
    result = run("agent", "--config", str(cfg), "--check")
    assert_clean_failure(result)
    (line,) = error_lines(result)
    assert line.startswith(f"error: {cfg}: interface: ")
    assert "is not an interface name" in line


def test_agent_check_unknown_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('node = "n1"\ncluster = "lab"\nunderlay_address = "192.0.2.11"\nlisten_prot = 51820\n')
    result = run("agent", "--config", str(cfg), "--check")
    assert_clean_failure(result)
    assert error_lines(result) == [f"error: {cfg}: listen_prot: unknown field"]


def test_agent_check_syntax_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("node = \n")
    result = run("agent", "--config", str(cfg), "--check")
    assert_clean_failure(result)
    assert error_lines(result)[0].startswith(f"error: {cfg}: syntax: ")


def test_agent_check_good_config(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('node = "n1"\ncluster = "lab"\nunderlay_address = "192.0.2.11"\n')
    result = run("agent", "--config", str(cfg), "--check")
    assert result.exit_code == 0, result.output
    assert f"{cfg}: ok (node n1, cluster lab)" in result.stderr


def test_agent_requires_config() -> None:
    result = run("agent", "--check")
    assert result.exit_code == 2
    assert "'-c' / '--config'" in result.stderr or "--config" in result.stderr
