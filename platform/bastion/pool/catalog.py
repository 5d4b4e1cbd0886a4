"""GPU classes Bastion knows out of the box, merged with the platform file's, and the pool's inventory.

Units: `vram_gb` is the marketed capacity, and GPU memory is marketed in binary units (an RTX 3090's "24 GB"
is 24 × 2^30 bytes, nvidia-smi shows 24576 MiB), so the planner reads it as GiB. `bandwidth_gbps` is
decimal (10^9 bytes per second), as vendors quote it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bastion.config.schema import GpuClassConfig, GpuPoolConfig
from bastion.errors import BastionError


class PoolError(BastionError):
    """A GPU class or pool node the platform does not know, or a plan that cannot be computed."""


@dataclass(frozen=True)
class GpuClass:
    """One card type: what the planner needs (memory, bandwidth) and what Ray schedules on (`resource`)."""

    key: str
    name: str
    vram_gb: float
    bandwidth_gbps: float
    resource: str


def _builtin(key: str, name: str, vram_gb: float, bandwidth_gbps: float) -> GpuClass:
    return GpuClass(key, name, vram_gb, bandwidth_gbps, f"gpu_{key}")


BUILTIN_CLASSES: Mapping[str, GpuClass] = {
    c.key: c
    for c in (
        _builtin("rtx3090", "RTX 3090", 24, 936),
        _builtin("rtx4090", "RTX 4090", 24, 1008),
        _builtin("rtx5090", "RTX 5090", 32, 1792),
        _builtin("l40s", "L40S", 48, 864),
        _builtin("a100", "A100 80GB", 80, 2039),
        _builtin("h100", "H100", 80, 3350),
        _builtin("h200", "H200", 141, 4800),
    )
}


def gpu_classes(pool: GpuPoolConfig | None = None) -> dict[str, GpuClass]:
    """Built-ins overlaid by the platform file's `gpu_pool.classes`: a new key adds a class, a known key replaces
    its numbers and resource (the display name stays, so `h100` is still shown as "H100")."""
    merged = dict(BUILTIN_CLASSES)
    for key, cfg in (pool.classes if pool else {}).items():
        merged[key] = _from_config(key, cfg, merged.get(key))
    return merged


def _from_config(key: str, cfg: GpuClassConfig, known: GpuClass | None) -> GpuClass:
    name = known.name if known else key
    return GpuClass(key, name, cfg.vram_gb, cfg.bandwidth_gbps, cfg.resource)


def select(classes: Mapping[str, GpuClass], keys: Iterable[str] | None) -> list[GpuClass]:
    """The classes named by `keys` in that order (all of them when None); an unknown key names the known ones."""
    if not keys:
        return list(classes.values())
    chosen = []
    for key in keys:
        if key not in classes:
            raise PoolError(f"unknown GPU class {key!r}; known: {', '.join(classes)}")
        chosen.append(classes[key])
    return chosen


@dataclass(frozen=True)
class PoolNode:
    """A node of the pool: how many cards of one class it holds, and the Ray resources that stand for them."""

    name: str
    gpu: GpuClass
    count: int

    @property
    def resources(self) -> dict[str, float]:
        return {self.gpu.resource: float(self.count)}


@dataclass(frozen=True)
class Inventory:
    """What the pool holds: its nodes, and totals per class (the placement code asks 'are there N of class X?')."""

    nodes: tuple[PoolNode, ...]

    def totals(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.gpu.key] = counts.get(node.gpu.key, 0) + node.count
        return counts

    def nodes_with(self, gpu_class: str) -> list[PoolNode]:
        return [n for n in self.nodes if n.gpu.key == gpu_class]


def inventory(pool: GpuPoolConfig) -> Inventory:
    """The pool's nodes with their classes resolved against built-ins plus the platform file's classes."""
    classes = gpu_classes(pool)
    nodes = []
    for node in pool.nodes:
        if node.gpu_class not in classes:
            raise PoolError(f"gpu_pool node {node.name!r}: unknown GPU class {node.gpu_class!r}")
        nodes.append(PoolNode(node.name, classes[node.gpu_class], node.count))
    return Inventory(tuple(nodes))
