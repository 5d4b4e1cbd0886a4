"""Keep Ray Serve on loopback in the single-machine mode, and the one place a local Ray is started.

Ray 2.60 binds every Serve replica's inter-deployment gRPC server to `[::]:0` (all interfaces) whatever the
node address, although with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 everything else in Ray binds 127.0.0.1 and its
peers reach each other there. This worker setup hook (Ray's `runtime_env.worker_process_setup_hook`) rebinds
that server to 127.0.0.1 in each worker, and only in that mode; a multi-node cluster keeps Ray's behaviour.
"""

from __future__ import annotations

import os

HOOK = "bastion.serve.loopback.bind_serve_grpc_to_loopback"  # Ray wants a dotted path, not module:attr


def loopback_mode() -> bool:
    return os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"


def bind_serve_grpc_to_loopback() -> None:
    if not loopback_mode():
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_bastion_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port._bastion_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


def runtime_env() -> dict:
    """What `ray.init(runtime_env=...)` gets in loopback mode."""
    return {"worker_process_setup_hook": HOOK} if loopback_mode() else {}


def start_local_ray(
    port: int,
    *,
    namespace: str,
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    host: str = "127.0.0.1",
) -> None:
    """A fresh local Ray and Serve on 127.0.0.1 only: what `bastion run`, `bench load` and the tests start.

    The environment is set before Ray is imported (every Ray process then binds and talks on loopback only);
    address "local" means a new cluster, never one another process left running on this machine.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        namespace=namespace,
        log_to_driver=log_to_driver,
        runtime_env=runtime_env(),
    )
    serve.start(http_options={"host": host, "port": port})
