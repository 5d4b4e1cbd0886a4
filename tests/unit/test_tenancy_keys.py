"""API key material: format, parsing, peppered HMAC, and the pepper file the embedded default creates."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bastion.errors import ConfigError
from bastion.tenancy import key_material

pytestmark = pytest.mark.unit


def test_generated_keys_parse_back_and_are_unique() -> None:
    made = [key_material.generate() for _ in range(50)]
    assert len({m.secret for m in made}) == 50 and len({m.prefix for m in made}) == 50
    for m in made:
        assert m.token.startswith("bst_") and key_material.parse(m.token) == (m.prefix, m.secret)
        assert len(m.secret) >= 43  # 32 random bytes, URL-safe base64


@pytest.mark.parametrize(
    "token",
    ["", "bst", "bst_", "sk-abc", "bst_0123456789ab", "bst_0123456789ab_", "bst_0123456789AB_x", "bst_short_x",
     "xst_0123456789ab_x", "bst_0123456789ab_" + "x" * 200],
)  # fmt: skip
def test_malformed_tokens_are_rejected(token: str) -> None:
    assert key_material.parse(token) is None


def test_hmac_depends_on_pepper_and_secret() -> None:
    pepper = b"p" * 32
    stored = key_material.hash_secret(pepper, "secret")
    assert len(stored) == 32
    assert key_material.verify(pepper, "secret", stored)
    assert not key_material.verify(pepper, "secreT", stored)
    assert not key_material.verify(b"q" * 32, "secret", stored)


def test_pepper_generated_once_with_owner_only_mode(tmp_path: Path) -> None:
    first = key_material.load_pepper(None, tmp_path)
    assert len(first) >= 32 and key_material.load_pepper(None, tmp_path) == first
    mode = stat.S_IMODE(os.stat(tmp_path / key_material.PEPPER_FILE_NAME).st_mode)
    assert mode == 0o600


def test_configured_pepper_file(tmp_path: Path) -> None:
    path = tmp_path / "pepper"
    path.write_bytes(b"z" * 40 + b"\n")
    assert key_material.load_pepper(path, tmp_path / "unused") == b"z" * 40
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="fewer than 32"):
        key_material.load_pepper(path, tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        key_material.load_pepper(tmp_path / "missing", tmp_path)
