"""How the jobs (`specvlm caption`, `distill`, `serve`) reach Ray: one rule for all three.

- ``--address ADDR`` or ``$RAY_ADDRESS``: join that cluster (``auto`` = the one ``ray start`` left running here).
- neither: start a fresh private Ray on loopback for this command, and stop it on exit. Ray's own fallback
  (join whatever cluster ``<ray temp dir>/ray_current_cluster`` names, often a stale one from an earlier
  ``ray start``) is never used: ``address="local"`` tells ``ray.init`` to start a new instance.

Ray's own ports (GCS, raylet, object manager, dashboard) bind all interfaces on a cluster started by
``ray start``; outside a laptop turn on Ray's token authentication (``RAY_AUTH_MODE=token``) and keep
those ports behind a firewall. The private instance started here listens on 127.0.0.1 only.
"""

from __future__ import annotations

import os


def init_ray(address: str | None = None, runtime_env: dict | None = None, dashboard: bool = False) -> bool:
    """Connect this process to Ray by the rule above; returns True when it started its own local instance.

    A process already connected (a test, a notebook, a Ray job's driver) keeps its connection. ``dashboard``:
    the private instance runs Ray's dashboard too (on 127.0.0.1), for what needs its state API (Ray Train's
    controller polls it; without it every poll logs a warning).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        loopback = address.split("://")[-1].startswith(("127.", "localhost"))  # this driver stays on loopback too
        ray.init(address=address, runtime_env=runtime_env, **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
        return False
    ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", runtime_env=runtime_env,
             _node_ip_address="127.0.0.1")  # fmt: skip
    return True


def add_address_flag(parser) -> None:
    """The ``--address`` flag every job shares."""
    parser.add_argument(
        "--address",
        help="join this Ray cluster ('auto' = the one `ray start` runs here); default: $RAY_ADDRESS, "
        "else start a private local Ray on 127.0.0.1 for this command",
    )
