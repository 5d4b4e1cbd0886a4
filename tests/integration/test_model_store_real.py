"""The real bundled model: built from the package's GGUF without a hub, verified, and refused when corrupted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bastion.engine.engine_args import EngineSpec
from bastion.engine.manifest import MANIFEST, verify_manifest
from bastion.engine.model_store import prepare_bundled
from bastion.engine.replica import EngineReplica
from bastion.errors import ModelStoreError

pytestmark = pytest.mark.integration


def test_prepared_model_is_a_vllm_loadable_folder(bundled_model: Path) -> None:
    verify_manifest(bundled_model, "smollm2-135m")
    assert (bundled_model / "config.json").is_file()
    assert (bundled_model / "model.safetensors").stat().st_size > 100_000_000
    assert prepare_bundled("smollm2-135m", bundled_model.parents[1]) == bundled_model  # cached: no rebuild


async def test_replica_refuses_a_corrupted_model(bundled_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "smollm2-135m"
    copy.mkdir()
    for item in bundled_model.iterdir():
        if item.name == "model.safetensors":
            (copy / item.name).symlink_to(item)  # no need to copy 260 MB: the corrupted file is another one
        else:
            shutil.copy(item, copy / item.name)
    assert (copy / MANIFEST).is_file()
    config = copy / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))
    spec = EngineSpec(
        model="smollm2-135m",
        profile="deep-context",
        path=str(copy),
        served_name="smollm2-135m",
        max_model_len=512,
        engine_kwargs={"model": str(copy)},
    )
    with pytest.raises(ModelStoreError, match=r"tokenizer_config\.json does not match its sha256"):
        await EngineReplica.create(spec)
