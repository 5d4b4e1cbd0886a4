"""This process's engine-deployment routers, by deployment name: the gateway's live view of every replica.

Why a module of its own: Ray Serve pickles the request-router module *by value* when it deploys
(`cloudpickle.register_pickle_by_value` in ray/serve/config.py), so a registry kept in `serve/router.py` would be
copied (and a weak reference cannot be pickled at all). This module is imported by reference from there, so the
routers register here and `live_replicas()` reads the one table.
"""

from __future__ import annotations

import weakref
from typing import Any

_ROUTERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register(deployment: str, router: Any) -> None:
    _ROUTERS[deployment] = router


def live_replicas() -> dict[str, list[dict[str, Any]]]:
    """Per deployment, the replicas Serve routes to now, with the stats each last reported
    (`EngineDeployment.record_routing_stats`, refreshed every ROUTING_STATS_PERIOD_S) and the queue length
    this process last saw. Empty for a deployment this process has not yet got a replica list for."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, router in list(_ROUTERS.items()):
        out[name] = [
            {
                "replica": rid.unique_id,
                "node_id": replica.node_id,
                "max_ongoing_requests": replica.max_ongoing_requests,
                "queue_len": router.replica_queue_len_cache.get(rid),
                "stats": dict(replica.routing_stats or {}),
            }
            for rid, replica in router.curr_replicas.items()
        ]
    return out
