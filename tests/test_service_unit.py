"""Issue 14 item 3: a system unit never runs the agent as root unless asked, and is sandboxed (systemd-analyze)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
UNPRIVILEGED = "daemon"  # exists on every Debian-like system; "nobody" is refused by systemd-analyze verify


def _install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hermes-gateway"), "install-service", "--systemd", "--print", *args],
                          capture_output=True, text=True, timeout=30)


def _lines(unit: str) -> set[str]:
    return set(unit.splitlines())


def _verify(tmp_path: Path, unit: str) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return
    path = tmp_path / "hermes-gateway.service"
    path.write_text(unit)
    res = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


def _exposure(tmp_path: Path, unit: str) -> float:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    path = tmp_path / "hermes-gateway.service"
    path.write_text(unit)
    res = subprocess.run([tool, "security", "--offline=yes", str(path)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit file offline: {res.stderr.strip()[:200]}")
    return float(found.group(1))


@pytest.mark.skipif(os.getuid() != 0, reason="as a user, install-service writes a user unit by default")
def test_a_root_system_unit_is_refused_without_an_explicit_flag():
    res = _install()
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "as root" in res.stderr
    for flag in ("--user NAME", "--dynamic-user", "--allow-root"):
        assert flag in res.stderr
    res = _install("--user", "root")
    assert res.returncode == 2 and "uid 0" in res.stderr
    res = _install("--user", "no-such-user-here")
    assert res.returncode == 2 and "no such user" in res.stderr
    assert _install("--allow-root").returncode == 0


def test_a_system_unit_runs_as_the_named_user_sandboxed(tmp_path):
    res = _install("--user", UNPRIVILEGED)
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stdout)
    assert f"User={UNPRIVILEGED}" in lines
    for line in ("ProtectSystem=strict", "ProtectHome=read-only", "PrivateTmp=yes", "LimitNOFILE=65536",
                 "TasksMax=4096", "MemoryMax=infinity", "StateDirectory=hermes-supervisor",
                 "Environment=HERMES_GATEWAY_DATA_DIR=%S/hermes-supervisor", "CapabilityBoundingSet=",
                 "NoNewPrivileges=yes", "UMask=0077"):
        assert line in lines, line
    _verify(tmp_path, res.stdout)
    assert _exposure(tmp_path, res.stdout) <= 4.5


def test_a_dynamic_user_unit_keeps_its_data_in_the_state_directory(tmp_path):
    res = _install("--dynamic-user", "--tasks-max", "512", "--memory-max", "8G", "--limit-nofile", "100000")
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stdout)
    assert "DynamicUser=yes" in lines and not any(x.startswith("User=") for x in lines)
    for line in ("StateDirectory=hermes-supervisor", "RuntimeDirectory=hermes-supervisor", "TasksMax=512",
                 "MemoryMax=8G", "LimitNOFILE=100000"):
        assert line in lines, line
    _verify(tmp_path, res.stdout)
    assert _exposure(tmp_path, res.stdout) <= 4.5
    bad = _install("--dynamic-user", "--memory-max", "lots")
    assert bad.returncode == 2 and "'lots'" in bad.stderr


def test_a_data_dir_from_the_config_file_is_kept_and_made_writable(tmp_path):
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "{tmp_path / "state"}"\n')
    res = _install("--user", UNPRIVILEGED, "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stdout)
    assert f"ReadWritePaths=-{tmp_path / 'state'}" in lines
    assert not any(x.startswith("Environment=HERMES_GATEWAY_DATA_DIR") for x in lines)  # the file's value wins


def test_a_user_unit_gets_the_descriptor_limit_too(tmp_path):
    res = _install("--user")
    assert res.returncode == 0, res.stderr
    lines = _lines(res.stdout)
    assert "LimitNOFILE=65536" in lines and not any(x.startswith(("User=", "DynamicUser=")) for x in lines)
