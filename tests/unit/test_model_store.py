"""The model store's manifest: any changed, missing or extra file stops a replica with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config.schema import ModelConfig
from bastion.engine.model_store import MANIFEST, model_path, verify_manifest, write_manifest
from bastion.errors import ModelStoreError

pytestmark = pytest.mark.unit


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (model / "sub" / "tokenizer.json").write_text("{}")
    write_manifest(model)
    return model


def test_intact_folder_verifies(folder: Path) -> None:
    verify_manifest(folder, "m")


def test_one_flipped_byte_is_detected(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match=r"model m: file model.safetensors does not match its sha256"):
        verify_manifest(folder, "m")


def test_missing_and_extra_files_are_named(folder: Path) -> None:
    (folder / "sub" / "tokenizer.json").unlink()
    with pytest.raises(ModelStoreError, match=r"sub/tokenizer\.json listed in the manifest is missing"):
        verify_manifest(folder, "m")
    (folder / "sub" / "tokenizer.json").write_text("{}")
    (folder / "evil.py").write_text("print(1)")
    with pytest.raises(ModelStoreError, match=r"evil\.py is not in the manifest"):
        verify_manifest(folder, "m")


def test_no_manifest_or_no_folder(tmp_path: Path, folder: Path) -> None:
    (folder / MANIFEST).unlink()
    with pytest.raises(ModelStoreError, match=r"no bastion-manifest\.json"):
        verify_manifest(folder, "m")
    with pytest.raises(ModelStoreError, match="does not exist"):
        verify_manifest(tmp_path / "nope", "m")


def test_bundled_models_live_in_the_data_dir(tmp_path: Path) -> None:
    bundled = ModelConfig(name="small", source="bundled:smollm2-135m", max_model_len=2048)
    assert model_path(bundled, tmp_path) == tmp_path / "models" / "smollm2-135m"
    local = ModelConfig(name="big", source="/models/qwen", max_model_len=8192)
    assert model_path(local, tmp_path) == Path("/models/qwen")
    with pytest.raises(ModelStoreError, match="unknown bundled model"):
        model_path(ModelConfig(name="x", source="bundled:gpt-9", max_model_len=1), tmp_path)
