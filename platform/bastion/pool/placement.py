"""Placement check: can the Ray cluster host every deployment's replicas? Say exactly what is missing.

Ray Serve keeps a replica it cannot place in "deploying" with no error (ENVIRONMENT.md), so Bastion compares what
the deployments ask for with what the nodes hold before it deploys. Pure logic: the caller passes each
deployment's per-replica resources (from the same `ray_actor_options` that Serve gets) and the nodes'
resources (from `ray.nodes()`), so tests need no cluster.

A replica is one Ray actor, and an actor's resources must all come from one node: the check packs replicas onto
nodes (largest first), not only totals. Tensor parallelism across nodes is not attempted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bastion.pool.catalog import GpuClass, PoolError
from bastion.pool.planner import DEFAULT_RESERVE_GIB

# Ray's built-in resource names, and how to add them to a node (`ray start` flags).
CPU, GPU, MEMORY = "CPU", "GPU", "memory"
_FLAGS = {CPU: "--num-cpus", GPU: "--num-gpus"}
_IGNORED_PREFIXES = ("node:", "accelerator_type:", "object_store_memory", "bundle_group_")
_EPS = 1e-9


class PlacementError(PoolError):
    """The cluster cannot host a deployment: the message names the deployment, the resource and the fix."""


@dataclass(frozen=True)
class Demand:
    """One deployment's ask: `per_replica` resources (Ray names: CPU, GPU, custom) times `replicas`.

    `gpu_class` (when the deployment names one) lets the message suggest tensor parallelism."""

    name: str
    per_replica: Mapping[str, float]
    replicas: int
    gpu_class: str | None = None

    def total(self, resource: str) -> float:
        return self.per_replica.get(resource, 0.0) * self.replicas


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    resources: Mapping[str, float]


@dataclass
class Shortfall:
    """Why (part of) a deployment does not fit, as a sentence an operator can act on."""

    deployment: str
    resource: str
    message: str
    placed: int = 0
    replicas: int = 0


@dataclass
class PlacementReport:
    shortfalls: list[Shortfall] = field(default_factory=list)
    assignment: dict[str, list[str]] = field(default_factory=dict)  # deployment → node ids, one per replica

    @property
    def ok(self) -> bool:
        return not self.shortfalls

    def message(self) -> str:
        return "; ".join(s.message for s in self.shortfalls)

    def raise_if_failed(self) -> None:
        if self.shortfalls:
            raise PlacementError("cannot place the deployments on this Ray cluster: " + self.message())


def demand_from_actor_options(
    name: str, actor_options: Mapping[str, object], replicas: int, gpu_class: str | None = None
) -> Demand:
    """The per-replica resources Ray will reserve for `ray_actor_options` (num_cpus default 1, as Serve's)."""
    per: dict[str, float] = {}
    cpus = actor_options.get("num_cpus", 1)
    gpus = actor_options.get("num_gpus", 0)
    memory = actor_options.get("memory", 0)
    for key, value in ((CPU, cpus), (GPU, gpus), (MEMORY, memory)):
        if value:
            per[key] = float(value)  # type: ignore[arg-type]
    for key, value in dict(actor_options.get("resources") or {}).items():  # type: ignore[call-overload]
        if value:
            per[str(key)] = float(value)
    return Demand(name, per, replicas, gpu_class)


def nodes_from_ray(nodes: Iterable[Mapping[str, object]]) -> list[NodeCapacity]:
    """Live nodes from `ray.nodes()` (each has `Alive`, `NodeID` and `Resources`)."""
    out = []
    for node in nodes:
        if not node.get("Alive", True):
            continue
        resources = {
            str(k): float(v)  # type: ignore[arg-type]
            for k, v in dict(node.get("Resources") or {}).items()  # type: ignore[call-overload]
            if not str(k).startswith(_IGNORED_PREFIXES)
        }
        out.append(NodeCapacity(str(node.get("NodeID", "?")), resources))
    return out


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _fix(resource: str, per_replica: float) -> str:
    amount = max(1, math.ceil(per_replica))
    if resource in _FLAGS:
        return f"add a node with {_FLAGS[resource]} {amount} (or more)"
    if resource == MEMORY:
        return "add a node with more memory"
    return f"add a node with --resources '{json.dumps({resource: amount})}'"


def check(
    demands: Sequence[Demand],
    nodes: Sequence[NodeCapacity],
    gpu_classes: Mapping[str, GpuClass] | None = None,
    tp_hints: Mapping[str, int] | None = None,
) -> PlacementReport:
    """Pack every replica onto a node; report, per deployment, the first resource that runs short.

    `tp_hints` (deployment → GPUs per replica the weights need, from the planner) adds a tensor-parallel
    suggestion when a deployment asks for fewer cards than its weights need."""
    report = PlacementReport()
    totals: dict[str, float] = {}
    for node in nodes:
        for key, value in node.resources.items():
            totals[key] = totals.get(key, 0.0) + value

    # 1. Totals: the whole cluster against the sum of all deployments (several may share a resource). GPU class
    # resources first: "no RTX 3090 at all" says more than the CPU shortfall that usually comes with it.
    users: dict[str, list[Demand]] = {}
    for d in demands:
        for key in d.per_replica:
            if d.replicas:
                users.setdefault(key, []).append(d)
    blamed: set[str] = set()
    for key in sorted(users, key=_priority):
        ds = users[key]
        wanted = sum(d.total(key) for d in ds)
        have = totals.get(key, 0.0)
        if wanted <= have + _EPS:
            continue
        unexplained = [d for d in ds if d.name not in blamed]
        if sum(d.total(key) for d in unexplained) <= have + _EPS:
            continue  # fixing the shortfalls already reported fixes this one too
        blamed.update(d.name for d in ds)
        if len(ds) == 1:
            (d,) = ds
            per = d.per_replica[key]
            text = (
                f"{d.name} needs {_fmt(wanted)} × {key} ({_fmt(per)} per replica × {d.replicas} "
                f"replica{'s' if d.replicas != 1 else ''}); the cluster has {_fmt(have)} — {_fix(key, per)}"
            )
        else:
            parts = ", ".join(f"{d.name} {_fmt(d.total(key))}" for d in ds)
            per = max(d.per_replica[key] for d in ds)
            text = (
                f"the deployments need {_fmt(wanted)} × {key} together ({parts}); the cluster has {_fmt(have)} — "
                f"{_fix(key, per)}, or lower replicas"
            )
        report.shortfalls.append(
            Shortfall(", ".join(d.name for d in ds), key, text, replicas=sum(d.replicas for d in ds))
        )
    # 2. Per node: a replica's resources come from one node; pack the biggest asks first.
    free = {n.node_id: dict(n.resources) for n in nodes}
    short_names = {name for s in report.shortfalls for name in s.deployment.split(", ")}
    order = sorted(
        (d for d in demands if d.name not in short_names and d.replicas),
        key=lambda d: -sum(v for k, v in d.per_replica.items() if k != MEMORY),
    )
    for d in order:
        placed: list[str] = []
        for _ in range(d.replicas):
            node_id = _fit(d.per_replica, free)
            if node_id is None:
                break
            for key, value in d.per_replica.items():
                free[node_id][key] -= value
            placed.append(node_id)
        report.assignment[d.name] = placed
        if len(placed) < d.replicas:
            report.shortfalls.append(_node_shortfall(d, len(placed), nodes))
    for s in report.shortfalls:
        _add_tp_hint(s, demands, gpu_classes, tp_hints)
    return report


def _priority(resource: str) -> tuple[int, str]:
    """Custom resources (GPU classes) first, then GPU, CPU, memory."""
    return ({GPU: 1, CPU: 2, MEMORY: 3}.get(resource, 0), resource)


def _fit(per_replica: Mapping[str, float], free: Mapping[str, Mapping[str, float]]) -> str | None:
    """The node with room for one replica, preferring the fullest one that fits (keeps big nodes whole)."""
    fitting = [
        node_id
        for node_id, res in free.items()
        if all(res.get(key, 0.0) + _EPS >= value for key, value in per_replica.items())
    ]
    if not fitting:
        return None
    return min(fitting, key=lambda n: (sum(v for k, v in free[n].items() if k != MEMORY), n))


def _node_shortfall(d: Demand, placed: int, nodes: Sequence[NodeCapacity]) -> Shortfall:
    ask = ", ".join(f"{_fmt(v)} × {k}" for k, v in sorted(d.per_replica.items()))
    lacking = [
        k
        for k, v in sorted(d.per_replica.items(), key=lambda kv: _priority(kv[0]))
        if max((n.resources.get(k, 0.0) for n in nodes), default=0) < v
    ]
    if lacking:
        key = lacking[0]
        biggest = max((n.resources.get(key, 0.0) for n in nodes), default=0.0)
        why = (
            f"no node has {_fmt(d.per_replica[key])} × {key} (the largest has {_fmt(biggest)}); a replica's "
            f"resources must come from one node — {_fix(key, d.per_replica[key])}"
        )
    else:
        why = (
            f"the nodes have enough in total but not together on one node once the other deployments are "
            f"placed ({placed} of {d.replicas} replicas fit) — add a node with {ask}"
        )
        key = next(iter(d.per_replica), "")
    return Shortfall(d.name, key, f"{d.name} needs {ask} on one node per replica; {why}", placed, d.replicas)


def _add_tp_hint(
    s: Shortfall,
    demands: Sequence[Demand],
    gpu_classes: Mapping[str, GpuClass] | None,
    tp_hints: Mapping[str, int] | None,
) -> None:
    d = next((d for d in demands if d.name == s.deployment), None)  # a shared shortfall gets no hint
    if d is None or not tp_hints or d.name not in tp_hints:
        return
    need = tp_hints[d.name]
    have = d.per_replica.get(GPU, 0.0)
    card = gpu_classes[d.gpu_class].name if gpu_classes and d.gpu_class in gpu_classes else d.gpu_class or "card"
    if need > have:
        s.message += (
            f" (the weights do not fit one {card}: set gpus_per_replica: {need} for tensor parallelism, "
            f"and give each node {need} cards of that class)"
        )


def gpus_for_weights(weights_gib: float, vram_gib: float, reserve_gib: float) -> int:
    """The smallest power-of-two tensor-parallel degree whose cards hold the weights with room to spare.

    vLLM splits weights evenly over TP ranks and wants the degree to divide the attention heads, so
    powers of two are the safe choice; each card still needs its runtime reserve and some KV cache."""
    room = vram_gib - reserve_gib
    if room <= 0:
        raise PlacementError(f"a {vram_gib:g} GiB card has no room after a {reserve_gib:g} GiB reserve")
    tp = 1
    while weights_gib / tp > room * 0.9 and tp < 64:
        tp *= 2
    return tp


def tensor_parallel_hints(
    deployments: Iterable[tuple[str, str | None, int, float | None]],
    gpu_classes: Mapping[str, GpuClass],
    reserve_gib: float | None = None,
) -> dict[str, int]:
    """Deployment → GPUs per replica its weights need, for those that ask for fewer.

    Each entry is (deployment name, GPU class, gpus_per_replica, weights in GiB or None when unknown)."""
    reserve = DEFAULT_RESERVE_GIB if reserve_gib is None else reserve_gib
    hints = {}
    for name, gpu_class, gpus, weights_gib in deployments:
        if gpu_class is None or weights_gib is None or gpu_class not in gpu_classes:
            continue
        need = gpus_for_weights(weights_gib, gpu_classes[gpu_class].vram_gb, reserve)
        if need > max(gpus, 1):
            hints[name] = need
    return hints
