"""A config file a person got wrong is refused with a message naming the file and what is
wrong — never a traceback (common/config.py `parse_config`, `load_config`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from netkit import REPO_ROOT

from common.config import load_config, parse_config
from common.errors import ConfigError

GOOD = '[network]\nid = "demo"\n\n[[participants]]\nid = "alice"\nname = "Alice"\n'


def test_a_good_config_parses() -> None:
    assert parse_config(GOOD).participant("alice").name == "Alice"


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_config_not_in_utf8_is_refused_with_the_byte(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "network.toml"
    path.write_bytes(GOOD.replace("Alice", "Bob Müller").encode(encoding))
    with pytest.raises(ConfigError, match=r"network\.toml: not UTF-8 text .*save it as UTF-8"):
        load_config(path)


@pytest.mark.parametrize(("table", "key"), [
    ("ledger", "path"), ("router", "admin_socket"), ("router", "plugin_state_dir"),
    ("payer", "control_dir"), ("payer", "receipts_dir")])
def test_a_nul_in_a_path_is_refused(table: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\$\.{table}\.{key}"):
        parse_config(f'{GOOD}\n[{table}]\n{key} = "a\\u0000b"\n')


@pytest.mark.parametrize("key", ["keys_dir", "participants_file"])
def test_a_nul_in_a_network_path_is_refused(key: str) -> None:
    config = GOOD.replace('id = "demo"\n', f'id = "demo"\n{key} = "x\\u0000"\n', 1)
    with pytest.raises(ConfigError, match=rf"\$\.network\.{key}"):
        parse_config(config)


def test_a_plugin_named_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"plug-in 'fee' is listed twice"):
        parse_config(f'{GOOD}\n[router]\nplugins = ["fee", "fee"]\n')


@pytest.mark.parametrize("service", ["router", "ledger"])
def test_a_bad_log_level_is_a_usage_error(tmp_path: Path, service: str) -> None:
    config = tmp_path / "network.toml"
    config.write_text(GOOD)
    proc = subprocess.run([sys.executable, "-m", service, "--config", str(config),
                           "--log-level", "BOGUS"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=30, check=False)
    assert proc.returncode == 2
    assert "--log-level" in proc.stderr
    assert "BOGUS" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("table", ["router", "ledger"])
@pytest.mark.parametrize("addr", ["9401", "localhost", "host:port", "localhost:99999", ":9401"])
def test_a_metrics_addr_that_is_not_host_port_is_refused_at_load(table: str, addr: str) -> None:
    """At load (exit 2 before anything starts), not after the router reached its ledger."""
    with pytest.raises(ConfigError, match=r"metrics_addr .*expected HOST:PORT with a port 0-65535"):
        parse_config(f'{GOOD}\n[{table}]\nmetrics_addr = "{addr}"\n')


@pytest.mark.parametrize("addr", ["", "127.0.0.1:9401", "localhost:0", "[::1]:9401", "::1:9401"])
def test_metrics_addrs_that_are_host_port(addr: str) -> None:
    assert parse_config(f'{GOOD}\n[router]\nmetrics_addr = "{addr}"\n').router.metrics_addr == addr


def test_a_router_address_to_connect_to_needs_a_real_port(tmp_path: Path) -> None:
    """`jackpay-payer run --router HOST:0` cannot connect anywhere: a usage error."""
    config = tmp_path / "network.toml"
    config.write_text(GOOD)
    proc = subprocess.run([sys.executable, "-m", "payer_client", "run", "--config",
                           str(config), "--id", "alice", "--router", "127.0.0.1:0"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=30,
                          check=False)
    assert proc.returncode == 2
    assert "--router: '127.0.0.1:0': expected HOST:PORT with a port 1-65535" in proc.stderr
