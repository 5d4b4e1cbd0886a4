"""`bastion run`'s way of serving, stopped by SIGTERM: run by test_sigterm.py in its own process group.

Starts a fresh local Ray (loopback only) and Serve on the port given as argv[1], deploys the product's gateway
ingress over two scripted engine replicas (slow tokens), prints `READY <api key>` and then serves through
`bastion.serve.runner.wait_forever` — the very loop `bastion run` ends in — until the test sends SIGTERM.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_worker_niceness", "0")

import asyncio
import sys
import tempfile
from pathlib import Path

import yaml

WORDS = 30
DELAY_S = 0.2  # a 6-second stream: long enough to be in flight when SIGTERM arrives


def main() -> None:
    from ray import serve

    from bastion.bench.scripted import scripted_gateway_app, scripted_platform_file
    from bastion.config import load_config
    from bastion.db import migrate
    from bastion.serve.loopback import start_local_ray
    from bastion.serve.runner import bootstrap_tenant, wait_forever

    port = int(sys.argv[1])
    run_dir = Path(tempfile.mkdtemp(prefix="bastion-sigterm-"))
    path = run_dir / "platform.yaml"
    data = scripted_platform_file(str(run_dir), f"sqlite+aiosqlite:///{run_dir / 'bastion.db'}")
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    migrate.upgrade(config.database.url)
    token = asyncio.run(bootstrap_tenant(config))
    start_local_ray(port, namespace="bastion-bench", num_cpus=2, log_to_driver=False)
    app = scripted_gateway_app(str(path), replicas=2, words=WORDS, token_delay_s=DELAY_S)
    serve.run(app, name="bastion", route_prefix="/")
    print(f"READY {token}", flush=True)
    wait_forever()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    main()
