"""No secret the tests created may appear in any log of the run (tests/secret_scan.py collects them).

`test_no_secret_in_any_log` is moved to the very end of the session by conftest, after every other test has
logged what it logs; the other tests here prove the scanner and the automatic registration work."""

from __future__ import annotations

import logging
import secrets
import sys
from pathlib import Path

import pytest

import secret_scan

sys.path.insert(0, str(Path(__file__).resolve().parent / "oidc"))
import idp_harness as h

from bastion.bench.doubles import TEST_PEPPER
from bastion.tenancy import key_material

# Fixed secrets of the test harness: the provider's client secret, the users' password, the key pepper.
for fixed in (h.CLIENT_SECRET, h.PASSWORD, TEST_PEPPER.decode()):
    secret_scan.register_secret(fixed)


def test_scanner_finds_a_planted_secret(tmp_path: Path) -> None:
    # Not through key_material.generate (that would register it for the real scan at the end): same shape, unregistered.
    planted = key_material.NewKeyMaterial(prefix="0123456789ab", secret=secrets.token_urlsafe(32))
    log = logging.getLogger("bastion.test.planted")
    log.propagate = False  # only into this test's file, not into the session log
    handler = logging.FileHandler(tmp_path / "planted.log")
    log.addHandler(handler)
    try:
        log.warning("oops, a key: %s", planted.token)
        log.warning("and only its secret part: %s", planted.secret.upper())  # not the secret: must not match
    finally:
        log.removeHandler(handler)
        handler.close()
    (tmp_path / "clean.out").write_text("nothing to see")
    (tmp_path / "data.json").write_text(planted.token)  # not a log file: not scanned
    files = secret_scan.log_files([tmp_path])
    assert {f.name for f in files} == {"planted.log", "clean.out"}
    hits = secret_scan.scan(files, [planted.token, planted.secret, "never-logged-secret-value"])
    assert sorted(p.name for p, _ in hits) == ["planted.log", "planted.log"]  # the token and its secret part
    assert all(planted.secret not in shown and planted.token not in shown for _, shown in hits)  # redacted
    assert not secret_scan.scan([tmp_path / "clean.out"], [planted.token])


def test_generated_keys_and_local_passwords_are_registered(tmp_path: Path) -> None:
    from bastion.control import local_admin

    material = key_material.generate()
    assert {material.secret, material.token} <= secret_scan.secrets()
    password = local_admin.ensure_local_admin(tmp_path)
    assert password and password in secret_scan.secrets()
    assert secret_scan.register_secret("short") == "short" and "short" not in secret_scan.secrets()


@pytest.mark.integration
def test_no_secret_in_any_log() -> None:
    """Runs last: the session log (every record of this process), Ray's session logs, log files under the
    session's temp folders."""
    secret_scan.flush()
    files = secret_scan.log_files(secret_scan.log_dirs())
    assert any(f.name == secret_scan.SESSION_LOG for f in files), "the session log handler is not installed"
    wanted = secret_scan.secrets()
    assert len(wanted) >= 3
    hits = secret_scan.scan(files, wanted)
    print(f"\nsecret scan: {len(wanted)} secrets, {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")
    assert not hits, "secrets found in logs:\n" + "\n".join(f"{path}: {shown}" for path, shown in hits)
