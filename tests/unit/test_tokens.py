"""Consul tokens from every source (issue 17, item 5): checked, never echoed; files holding one are 0600."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from wiremesh.agent.config import load_config, parse_config
from wiremesh.agent.errors import ConfigError
from wiremesh.cli.main import cli
from wiremesh.clustermesh import ConsulOptions, InvalidToken, TokenFileError, check_token, read_token_file
from wiremesh.clustermesh.wizard import SetupError, load_answers, parse_answers

SECRET = "s3cr3t"  # every bad token below holds it: no message may show it

BAD = [
    (f"{SECRET} x", "holds whitespace (a space or a tab) at position 7 of 8"),
    (f"{SECRET}\n", "ends with a line break at position 7 of 7"),
    (f"{SECRET}\r\n", "ends with a line break"),
    (f"{SECRET}\nmore", "holds a line break at position 7"),
    (f" {SECRET}", "has whitespace around it"),
    (f"{SECRET}\tx", "holds whitespace"),
    (f"{SECRET}\x00", "holds a control character"),
    (f"{SECRET}\x1b[2J", "holds a control character"),
    (f"{SECRET}é", "holds a non-ASCII character"),
    (SECRET * 100, "is 600 characters long; a Consul token has at most 512"),
    ("", "is empty"),
]


@pytest.mark.parametrize("token", [str(uuid.uuid4()), "anonymous", "master-" + "x" * 505, "!#$%&'()*+,-./:;<=>?@[]^_`{|}~"])
def test_what_consul_takes_is_taken(token: str) -> None:
    assert check_token(token, "--token") == token
    assert ConsulOptions(token=token).token == token


@pytest.mark.parametrize("token, reason", BAD)
def test_a_bad_token_is_refused_naming_the_source_never_the_token(token: str, reason: str) -> None:
    with pytest.raises(InvalidToken) as e:
        check_token(token, "CONSUL_HTTP_TOKEN")
    assert str(e.value).startswith("CONSUL_HTTP_TOKEN: ") and reason in str(e.value)
    assert SECRET not in str(e.value) and SECRET not in (e.value.hint or "") and SECRET not in repr(e.value)


def test_consul_options_refuse_a_bad_token_whatever_made_them() -> None:
    with pytest.raises(InvalidToken, match="the Consul token: holds whitespace") as e:
        ConsulOptions(token=f"{SECRET} x")
    assert SECRET not in str(e.value)
    assert ConsulOptions(token="").token is None


# --- token files ---------------------------------------------------------------------------------------


def token_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "token"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_a_token_file_is_read_with_its_line_break_and_checked(tmp_path: Path) -> None:
    assert read_token_file(token_file(tmp_path, "abc-123\n")) == "abc-123"
    with pytest.raises(TokenFileError) as e:
        read_token_file(token_file(tmp_path, f"{SECRET} two\n"))
    assert "not a token (holds whitespace" in str(e.value) and SECRET not in str(e.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_token_file_others_may_read_or_write_is_refused_with_a_hint(tmp_path: Path, mode: int) -> None:
    p = token_file(tmp_path, SECRET, mode)
    with pytest.raises(TokenFileError) as e:
        read_token_file(p)
    assert f"mode {mode:04o} lets others read it" in str(e.value) and e.value.hint == f"chmod 600 {p}"
    assert SECRET not in str(e.value)


# --- agent.toml --------------------------------------------------------------------------------------


BASE = {"node": "node1", "cluster": "lab", "underlay_address": "192.0.2.11"}


def test_agent_toml_token_and_environment_tokens_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "consul": {"token": f"{SECRET}\n"}})
    assert e.value.field == "consul.token" and "ends with a line break" in e.value.reason and SECRET not in str(e.value)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", f"{SECRET} ")
    with pytest.raises(ConfigError) as e:
        parse_config(BASE)
    assert e.value.field == "CONSUL_HTTP_TOKEN" and "has whitespace around it" in e.value.reason
    assert SECRET not in str(e.value)
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "good-token")
    assert parse_config(BASE).consul.token == "good-token"


def test_agent_toml_holding_a_token_must_be_0600(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN_FILE", raising=False)
    path = tmp_path / "agent.toml"
    path.write_text('node = "node1"\ncluster = "lab"\nunderlay_address = "192.0.2.11"\n'
                    f'[consul]\ntoken = "{SECRET}"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.field == "consul.token" and "holds a token and mode 0644 lets others read it" in e.value.reason
    assert e.value.hint == f"chmod 600 {path}" and SECRET not in str(e.value)
    path.chmod(0o600)
    assert load_config(path).consul.token == SECRET
    path.write_text('node = "node1"\ncluster = "lab"\nunderlay_address = "192.0.2.11"\n')  # no token: any mode
    path.chmod(0o644)
    assert load_config(path).consul.token is None


# --- answers of `wiremesh setup` -------------------------------------------------------------------------


def answers(token: str | None) -> dict[str, object]:
    c: dict[str, object] = {"consul": "http://127.0.0.1:8500", "name": "east", "id": 1, "pod_cidr": "10.240.0.0/16"}
    if token is not None:
        c["token"] = token
    return {"clusters": [c]}


def test_an_answers_token_is_checked() -> None:
    with pytest.raises(SetupError) as e:
        parse_answers(answers(f"{SECRET}\n"), "a.yaml")
    assert e.value.field == "clusters[0].token" and "ends with a line break" in e.value.reason
    assert SECRET not in str(e.value)


def test_an_answers_file_holding_a_token_must_be_0600(tmp_path: Path) -> None:
    import json

    path = tmp_path / "answers.yaml"
    path.write_text(json.dumps(answers(SECRET)))
    path.chmod(0o644)
    with pytest.raises(SetupError) as e:
        load_answers(path)
    assert "holds a Consul token and mode 0644 lets others read it: it must be 0600" in str(e.value)
    assert e.value.hint == f"chmod 600 {path}" and SECRET not in str(e.value)
    path.chmod(0o600)
    assert load_answers(path)[0].token == SECRET
    path.write_text(json.dumps(answers(None)))
    path.chmod(0o644)
    assert load_answers(path)[0].token is None


# --- the CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, env, said", [
    (["--token", f"{SECRET} x"], {}, "error: --token: holds whitespace"),
    ([], {"CONSUL_HTTP_TOKEN": f"{SECRET}\n"}, "error: CONSUL_HTTP_TOKEN: ends with a line break"),
])
def test_the_cli_refuses_a_bad_token_in_one_line(args: list[str], env: dict[str, str], said: str) -> None:
    r = CliRunner().invoke(cli, [*args, "cluster", "list"], env={"NO_COLOR": "1", **env}, prog_name="wiremesh")
    assert r.exit_code == 1 and said in r.output and SECRET not in r.output, r.output
    assert "hint: a Consul token is printable ASCII" in r.output


def test_the_cli_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    p = token_file(tmp_path, SECRET, 0o644)
    r = CliRunner().invoke(cli, ["--token-file", str(p), "cluster", "list"], env={"NO_COLOR": "1"},
                           prog_name="wiremesh")
    assert r.exit_code == 1 and f"error: --token-file: token file {p}: mode 0644" in r.output, r.output
    assert f"hint: chmod 600 {p}" in r.output and SECRET not in r.output
