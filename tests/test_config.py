"""Configuration: validation naming every key, ${VAR}, and the CLI commands
that read it (check-config, status)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mailbridge.config import CmProviderConfig, ConfigError, load_config, parse_config
from tests.support import config_dict

REPO = Path(__file__).resolve().parent.parent


def test_the_embedded_default_is_valid() -> None:
    config = load_config(REPO / "config.yaml")
    assert config.providers["outbox"].type == "outbox"
    assert config.store.sqlite == REPO / "var" / "mailbridge.db"  # relative to the file
    assert config.reports.maildir == REPO / "var" / "reports"


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    raw = config_dict(tmp_path)
    raw["smtp"]["listen"] = "nowhere"
    raw["accounts"][0]["blacklist"] = [600000000]  # unquoted number in YAML
    raw["accounts"][0]["emetteur_typo"] = "x"
    raw["accounts"][0]["senders"] = ["12345"]
    raw["providers"]["cm"] = {"type": "cm"}
    raw["reports"]["smtp"] = {"host": "relay"}  # both maildir and smtp
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    problems = "\n".join(err.value.problems)
    for expected in (
        "smtp.listen: 'nowhere' is not host:port",
        "accounts[0].blacklist[0]: Input should be a valid string (quote it in YAML",
        "accounts[0].emetteur_typo: Extra inputs are not permitted",
        "accounts[0].senders: '12345': a sender id is 4-11 letters and digits",
        "providers.cm.product_token: Field required",
        "reports: set exactly one of reports.maildir or reports.smtp",
    ):
        assert expected in problems, problems


def test_references_between_sections(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, provider="nope")
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    assert err.value.problems == [
        "accounts[0].provider: 'nope' is not defined under providers (outbox)"
    ]
    raw = config_dict(tmp_path, provider=None, routes=[{"prefix": "+7", "providers": ["x"]}])
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    assert err.value.problems == [
        "accounts[0].routes[0].providers: 'x' is not defined under providers (outbox)"
    ]


def test_country_names_are_not_iso_codes(tmp_path: Path) -> None:
    """`countries: [France]` would give every number code 27: refused at start."""
    raw = config_dict(tmp_path, countries=["France", "re", "KZ"])
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    (problem,) = err.value.problems
    assert problem.startswith("accounts[0].countries: 'FRANCE': not ISO 3166 region codes")
    raw = config_dict(tmp_path, countries=["fr", "re", "KZ"])
    assert parse_config(raw, base_dir=tmp_path).accounts[0].countries == ["FR", "RE", "KZ"]


def test_settings_that_cancel_each_other(tmp_path: Path) -> None:
    raw = config_dict(tmp_path)
    raw["providers"]["outbox"].update(retry_attempts=2, circuit_failures=5, timeout_s=200)
    raw["dispatch"].update(lease_s=300, heartbeat_s=10, heartbeat_stale_s=15)
    raw["reports"].update(retry_backoff_s=60, retry_max_backoff_s=30)
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    keys = [p.split(":", 1)[0] for p in err.value.problems]
    assert keys == [
        "providers.outbox.circuit_failures",
        "dispatch.heartbeat_stale_s",
        "reports.retry_max_backoff_s",
    ], err.value.problems


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mailbridge.yaml"
    path.write_text("smtp:\n  listen: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert 'in "' + str(path) + '", line' in err.value.problems[0]


def test_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = config_dict(tmp_path)
    raw["providers"]["cm"] = {"type": "cm", "product_token": "${CM_TOKEN}"}
    raw["reports"]["from"] = "${FROM:-reports@bridge.test}"
    monkeypatch.setenv("CM_TOKEN", "secret-token")
    config = parse_config(raw, base_dir=tmp_path)
    cm = config.providers["cm"]
    assert isinstance(cm, CmProviderConfig) and cm.product_token == "secret-token"
    assert config.reports.from_address == "reports@bridge.test"
    monkeypatch.delenv("CM_TOKEN")
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    assert err.value.problems == [
        "providers.cm.product_token: environment variable CM_TOKEN is not set"
    ]


def test_route_prefixes_are_normalised(tmp_path: Path) -> None:
    raw = config_dict(tmp_path, provider=None, routes=[{"prefix": "7", "providers": ["outbox"]}])
    del raw["accounts"][0]["provider"]
    config = parse_config(raw, base_dir=tmp_path)
    assert config.accounts[0].routes is not None
    assert config.accounts[0].routes[0].prefix == "+7"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailbridge", *args], capture_output=True, text=True, timeout=120
    )


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config_dict(tmp_path)))
    out = run_cli("check-config", "-c", str(good))
    assert out.returncode == 0 and "OK" in out.stdout
    bad_raw = config_dict(tmp_path)
    bad_raw["accounts"][0]["max_parts"] = 0
    bad_raw["smtp"]["listen"] = "x"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_raw))
    out = run_cli("check-config", "-c", str(bad))
    assert out.returncode == 2
    assert "smtp.listen" in out.stderr and "accounts[0].max_parts" in out.stderr
    missing = run_cli("check-config", "-c", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_check_config_online_with_outbox(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(config_dict(tmp_path)))
    out = run_cli("check-config", "--online", "-c", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "provider outbox (outbox): writes to" in out.stdout
