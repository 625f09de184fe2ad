"""Where a search's trials run: the cluster named by ``RAY_ADDRESS``, else a private local Ray
that listens on loopback only and runs trials at the driver's priority.

Loopback: Ray decides its node IP (and with it whether its gRPC servers — GCS, raylet, every
worker — bind 127.0.0.1 or all interfaces) from ``ray._private.ray_constants
.ENABLE_RAY_CLUSTER``, read from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when Ray is *imported*;
``ray.init(_node_ip_address=...)`` alone does not move the GCS or the raylet. So the variable is
set before the import, and the constant is set too in case Ray was imported earlier in this
process. Measured with ``ss -ltnp`` (``tests/test_search.py``): every listening socket of the
instance — GCS, raylet (node manager, object manager), dashboard agent (gRPC, HTTP, metrics
export), runtime-env agent, the autoscaler monitor's and the dashboard head's Prometheus
endpoints, every worker and the driver — binds 127.0.0.1. What remains reachable, from this
machine only: the Prometheus endpoints answer without authentication (Ray's internal counters
and timings: no data, configurations or results); gRPC needs Ray's token (token
authentication stays on).

Niceness: Ray starts workers at niceness +15 (``RAY_worker_niceness``), which starves a
search on a shared machine against any neighbour; trials run at the driver's own niceness
unless the user sets ``RAY_worker_niceness``.
"""

from __future__ import annotations

import os
import sys


def init_ray(*, dashboard: bool = False) -> bool:
    """Join ``RAY_ADDRESS`` (``ray job submit`` sets it; ``auto`` joins a local ``ray start
    --head``), else start the private local instance described above. Returns True when this
    call started Ray (the caller stops it).

    A private instance (``address="local"``) rather than Ray's auto-detection: on a shared
    machine another user's head must never receive this search's trials. ``dashboard``: Ray
    Train's placement-group cleaner polls the State API, which lives in the dashboard; without
    it, DDP runs log a warning every few seconds.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if not sys.stdout.isatty():
        # No ANSI colour around Ray's "(_trial pid=…)" prefixes in logs and pipes.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # see the module docstring
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        log_to_driver=True,
    )
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()
