"""The model store's manifest: any changed, missing or extra file stops a replica with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config.schema import ModelConfig
from bastion.engine.manifest import MANIFEST, verify_manifest, write_manifest
from bastion.engine.model_store import model_path
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


# --- the bundled model: shipped MTP head, revision, rebuild -------------------------------------------


def test_shipped_head_matches_its_recorded_sha256() -> None:
    """The head file in deploy/mtp/heads/ is the one BUNDLED records: prepare would refuse any other."""
    from bastion.engine.model_store import BUNDLED, MTP_HEADS, _bundled_head

    spec = BUNDLED["smollm2-135m"]
    assert spec.mtp_head is not None and spec.mtp_head_sha256 is not None
    path = _bundled_head(spec)
    assert path == MTP_HEADS / spec.mtp_head
    assert path.stat().st_size < 12_000_000  # only the MTP layer, bfloat16
    assert spec.mtp_head_sha256 in spec.revision


@pytest.fixture
def fake_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A bundled model whose "GGUF conversion" writes a tiny random Llama, with a head exported for it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bastion.engine import model_store
    from bastion.engine.manifest import sha256_file
    from bastion.engine.model_store import BUNDLED, BundledModel
    from bastion.engine.mtp.graft import export_head, graft

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=8
    )
    calls: list[Path] = []

    def convert(_gguf: Path, out: Path, _progress: object) -> None:
        calls.append(out)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(out)
        (out / "tokenizer.json").write_text("{}")

    heads = tmp_path / "heads"
    convert(Path("x"), tmp_path / "src", None)
    export_head(graft(tmp_path / "src", tmp_path / "src-grafted"), heads / "tiny" / "head.safetensors")
    calls.clear()
    spec = BundledModel(
        name="tiny",
        package="none",
        gguf_file="tiny.gguf",
        tokenizer_repo_name="tiny",
        mtp_head="tiny/head.safetensors",
        mtp_head_sha256=sha256_file(heads / "tiny" / "head.safetensors"),
    )
    monkeypatch.setitem(BUNDLED, "tiny", spec)
    monkeypatch.setattr(model_store, "_bundled_gguf", lambda _spec: tmp_path / "tiny.gguf")
    monkeypatch.setattr(model_store, "_convert_gguf", convert)
    return {"heads": heads, "calls": calls, "data": tmp_path / "data", "spec": spec}


def test_prepare_grafts_the_shipped_head_and_caches(fake_bundle: dict) -> None:
    import json

    from bastion.engine.engine_args import mtp_layers
    from bastion.engine.model_store import BUNDLE_MARKER, bundle_revision, prepare_bundled

    folder = prepare_bundled("tiny", fake_bundle["data"], heads_dir=fake_bundle["heads"])
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MiMoForCausalLM"]
    assert mtp_layers(folder) == 1
    assert bundle_revision(folder) == fake_bundle["spec"].revision
    verify_manifest(folder, "tiny")  # the marker is part of the manifest
    assert (folder / BUNDLE_MARKER).is_file()
    assert prepare_bundled("tiny", fake_bundle["data"], heads_dir=fake_bundle["heads"]) == folder
    assert len(fake_bundle["calls"]) == 1  # the second call only verified
    assert not list(folder.parent.glob(".*partial"))


def test_prepare_rebuilds_a_folder_from_an_older_bastion(fake_bundle: dict) -> None:
    """A plain Llama folder with a manifest (what the previous release prepared) is rebuilt, not reused."""
    import json

    from bastion.engine.model_store import bundle_revision, prepare_bundled

    old = fake_bundle["data"] / "models" / "tiny"
    old.mkdir(parents=True)
    (old / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (old / "model.safetensors").write_bytes(b"old")
    write_manifest(old)
    assert bundle_revision(old) is None
    folder = prepare_bundled("tiny", fake_bundle["data"], heads_dir=fake_bundle["heads"])
    assert folder == old and len(fake_bundle["calls"]) == 1
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["MiMoForCausalLM"]
    # Another revision recorded (e.g. an older head) is rebuilt too.
    marker = folder / "bastion-bundle.json"
    marker.write_text(marker.read_text().replace(fake_bundle["spec"].revision, "2:an-older-head"))
    write_manifest(folder)
    prepare_bundled("tiny", fake_bundle["data"], heads_dir=fake_bundle["heads"])
    assert len(fake_bundle["calls"]) == 2 and bundle_revision(folder) == fake_bundle["spec"].revision


def test_prepare_refuses_a_changed_head_file(fake_bundle: dict) -> None:
    from bastion.engine.model_store import prepare_bundled

    head = fake_bundle["heads"] / "tiny" / "head.safetensors"
    head.write_bytes(head.read_bytes() + b" ")
    with pytest.raises(ModelStoreError, match="does not match its recorded sha256"):
        prepare_bundled("tiny", fake_bundle["data"], heads_dir=fake_bundle["heads"])
    assert not (fake_bundle["data"] / "models" / "tiny").exists()
