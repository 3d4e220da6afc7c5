"""Keeps every port of a local Ray instance on 127.0.0.1 (`splitveil serve --ray`).

Ray 2.60 binds its servers (GCS, raylet, workers, the dashboard agent, the Prometheus ports) to the machine's
routable address or to every interface, even for a local instance, and several of them answer without Ray's token.
It has no option to bind them to loopback; these two functions get it there, each checked by
`tests/network/test_ray_trunk.py`, which lists the listening sockets of every process of the instance.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes the node to be single and binds loopback


def keep_ray_on_loopback() -> None:
    """Makes the Ray instance started next bind all its ports to 127.0.0.1: GCS, raylet and object manager, every
    worker's gRPC port, the dashboard agent's gRPC, HTTP (52365) and metrics export ports, the runtime-env agent, and
    the dashboard's (44227) and autoscaler's (44217) Prometheus ports. Some of these answer without Ray's token.

    Ray 2.60 has no option for this: `ray.init(_node_ip_address="127.0.0.1")` (and `ray start --node-ip-address`) is
    rewritten to the machine's routable address, and its servers then listen on every interface. Ray keeps to
    loopback only for a node it takes to be unable to join a cluster, which it reads from
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: from the environment in the processes Ray starts, and from a constant
    computed at import in this process (which has imported Ray already). Ray Serve's replicas add one port of their
    own, kept on loopback by `keep_replica_grpc_on_loopback`. Checked by `tests/network/test_ray_trunk.py`, which
    lists the listening sockets of every Ray process.
    """
    from ray._private import ray_constants

    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def keep_replica_grpc_on_loopback() -> None:
    """In a replica of a loopback instance: binds Ray Serve's inter-deployment gRPC server to 127.0.0.1.

    Ray Serve 2.60 starts that server in every replica on "[::]:0" (every interface, whatever the node's address),
    right after the deployment's constructor returns, by calling `add_port_to_grpc_server` from its replica module;
    that call is redirected here. The server checks Ray's token, and the trunk does not use it (the ingress calls
    replicas as actors), but it need not face the network either. Left as Ray made it outside a loopback instance
    (a cluster's nodes reach each other's replicas), or when Ray's internals no longer have that function (then
    `tests/network/test_ray_trunk.py` fails on the exposed port)."""
    if os.environ.get(LOOPBACK_SWITCH) != "0":
        return
    try:
        from ray.serve._private import replica
        bind = replica.add_port_to_grpc_server
    except (ImportError, AttributeError):
        log.warning("Ray Serve's replica gRPC server could not be kept on loopback (Ray's internals changed)")
        return
    if getattr(bind, "on_loopback", False):
        return

    def bind_on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        return bind(server, address)

    bind_on_loopback.on_loopback = True
    replica.add_port_to_grpc_server = bind_on_loopback
