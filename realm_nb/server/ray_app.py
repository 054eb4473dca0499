"""`realm-nb serve --ray`: the server as a Ray Serve application, for more tenants than one
machine holds.

Two deployments:

- `Runtime`, N replicas (or autoscaled within --min-replicas/--max-replicas on the ongoing
  requests per replica): each a whole realm-nb runtime in its own Ray actor process, built by
  `serve.app_from_args` exactly as `realm-nb serve` builds one (its own kernel, store, guests,
  keys and limits), with the model list loaded before it takes requests.
- `Ingress`, one replica, behind Ray Serve's HTTP proxy on --host/--port: it reads whose request
  it is (`ray_routing.tenant_for`), hands the request to that tenant's replica through a
  `DeploymentHandle` routed by `ray_routing.TenantRouter` (sticky: the tenant's KV pages live
  there), and streams the answer back (`ray_bridge`). The ingress holds no model and does no
  compute; one replica of it keeps one routing table.

Every endpoint is the single-machine server's, answered by a replica's app, with an
`X-Realm-Replica` header naming the replica (its Ray Serve replica id; the actor is
`replica_actor_name(...)` in Ray's "serve" namespace). Two differences, both for consistency across
replicas: /v1/models/load and /v1/models/unload are refused (the models are the deployment's
--model list, so a replica started later by autoscaling or after a crash has the same ones), and
/v1/stats and /metrics describe the replica that serves the caller's tenant.

Ray is an optional extra (`pip install "realm-nb[ray]"`): this module imports it only inside
functions, so that without it `--ray` is a `MissingExtraError`, not an ImportError.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import catalogue
from ..errors import InvalidRequestError, MissingExtraError, RealmError
from .auth import KeyConfig, KeyTable, error_response, load_keys
from .ray_bridge import WireRequest, asgi_messages, on_disconnect, read_body, relay
from .serve import app_from_args, limits_from_args

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

APP_NAME = "realm-nb"
RUNTIME = "Runtime"
INGRESS = "Ingress"
# Requests one runtime replica may hold. High on purpose: the runtime queues and refuses (503
# queue_full) by itself, and a tenant's request must wait for *its* replica, never move.
RUNTIME_MAX_ONGOING = 1024
INGRESS_MAX_ONGOING = 4096  # every request in flight passes the one ingress replica
# How long a replica being stopped (scaled down, redeployed) may finish what it runs; past it the
# rest fail as replica_lost. Serve's default, 20 s, is shorter than a long generation.
DRAIN_ON_STOP_S = 120.0
FIXED_MODEL_PATHS = ("/v1/models/load", "/v1/models/unload")
# The `serve` flags a replica's app is built from (the rest are the deployment's).
APP_FLAGS = ("models", "weights", "mesh", "lazy", "models_dir", "max_body_bytes", "allowed_host")


def replica_actor_name(replica_id: str, app: str = APP_NAME) -> str:
    """The Ray actor (namespace "serve") of the runtime replica an X-Realm-Replica names."""
    return f"SERVE_REPLICA::{app}#{RUNTIME}#{replica_id}"


def require_ray() -> None:
    """Ray Serve is importable, or a MissingExtraError saying how to get it."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(
            f"realm-nb serve --ray needs Ray Serve, which is not installed here ({e}); "
            'install it with: pip install "realm-nb[ray]"', param="ray") from None


# ------------------------------------------------------------------------------ the deployments


class Runtime:
    """One runtime replica: the `realm-nb serve` app over its own kernel, answering the requests
    the ingress hands it (`asgi`)."""

    def __init__(self, app_flags: dict[str, Any], keys: dict[str, KeyConfig] | None) -> None:
        from ray import serve

        self.app, self.models = app_from_args(argparse.Namespace(**app_flags), keys,
                                              progress=False)
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def asgi(self, request: WireRequest, tenant: str) -> AsyncIterator[Message]:
        """The app's response messages to `request`. `tenant` is for the router only (the
        app's gate finds the tenant itself, from the same headers)."""
        async with contextlib.aclosing(asgi_messages(self.app, request, self.replica)) as out:
            async for message in out:
                yield message


class Ingress:
    """The ingress deployment: Ray Serve's proxy hands it every HTTP request (`IngressApp`)."""

    def __init__(self, runtime: DeploymentHandle, keys: dict[str, KeyConfig] | None,
                 max_body_bytes: int) -> None:
        # not `self.app`: Serve's wrapper has a read-only `app` property of its own
        self.ingress_app = IngressApp(runtime, keys, max_body_bytes)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """Ray Serve asks for the ASGI app after __init__ (`serve.ingress()` without an app)."""
        return self.ingress_app


class IngressApp:
    """The ingress's ASGI app: each request to its tenant's runtime replica, the answer streamed
    back. (A class with an async __call__, which is how uvicorn's lifespan runner, used by Serve,
    recognises an ASGI 3 app; a bound method it takes for ASGI 2.)"""

    def __init__(self, runtime: DeploymentHandle, keys: dict[str, KeyConfig] | None,
                 max_body_bytes: int) -> None:
        from ray.exceptions import RayActorError

        from .ray_routing import tenant_for

        self.runtime = runtime.options(method_name="asgi", stream=True)
        self.keys = KeyTable(keys) if keys else None
        self.max_body_bytes = max_body_bytes
        self.tenant_for = tenant_for
        self.lost = RayActorError  # what a call raises when its replica's actor died

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: none of our endpoints
            return
        if scope["path"] in FIXED_MODEL_PATHS:
            await error_response(InvalidRequestError(
                f"{scope['path']} is off under `realm-nb serve --ray`: every replica serves the "
                "deployment's models (its --model list), including replicas started later; "
                "to change them, deploy again with other --model flags",
                param="model"))(scope, receive, send)
            return
        tenant = self.tenant_for(dict(scope.get("headers") or []), self.keys)
        body = await read_body(receive, self.max_body_bytes + 1)
        if body is None:  # the client left before its request was whole
            return
        call = self.runtime.remote(WireRequest.from_scope(scope, body), tenant=tenant)
        watcher = asyncio.ensure_future(on_disconnect(receive, call.cancel))
        try:
            # stream=True: the call is a DeploymentResponseGenerator, an async iterator
            await relay(cast(AsyncIterator[Message], call), scope, receive, send,
                        is_lost=lambda e: isinstance(e, self.lost))
        finally:
            watcher.cancel()
            call.cancel()  # a no-op once the answer is whole; else the client left mid-way


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop in the ingress: acknowledge both."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ------------------------------------------------------------------------------ building, deploying


def check_ray_flags(args: argparse.Namespace) -> None:
    """The --ray flags make sense together (a mistake fails before Ray starts)."""
    if args.fd is not None:
        raise InvalidRequestError("--fd does not go with --ray: Ray Serve's proxy binds "
                                  "--host/--port itself", param="fd")
    lo, hi = args.min_replicas, args.max_replicas
    if (lo is None) != (hi is None):
        raise InvalidRequestError("give both --min-replicas and --max-replicas (autoscaling), "
                                  "or neither", param="min_replicas")
    if lo is not None and args.replicas is not None:
        raise InvalidRequestError("--replicas is a fixed count; with --min-replicas and "
                                  "--max-replicas the count follows the load: give one or the "
                                  "other", param="replicas")
    if lo is not None and (not 0 <= lo <= hi or hi < 1):
        raise InvalidRequestError(f"--min-replicas {lo} --max-replicas {hi}: need "
                                  "0 <= min <= max and max >= 1", param="min_replicas")
    if args.replicas is not None and args.replicas < 1:
        raise InvalidRequestError(f"--replicas {args.replicas}: give at least 1",
                                  param="replicas")


def check_capacity(args: argparse.Namespace, cpus: float) -> None:
    """The replicas to start fit the CPUs of a cluster that cannot grow (the one this command
    starts): else Serve would wait for a replica that never gets placed, and so would we."""
    first = args.replicas or max(args.min_replicas or 1, 1)
    if first * args.replica_cpus > cpus:
        raise InvalidRequestError(
            f"{first} replica(s) x --replica-cpus {args.replica_cpus:g} need more CPUs than "
            f"this machine's Ray cluster has ({cpus:g}): start fewer replicas, give a smaller "
            "--replica-cpus (a share: e.g. 0.5), or join a larger cluster with --ray-address",
            param="replicas")


def build_application(args: argparse.Namespace, keys: dict[str, KeyConfig] | None) -> Any:
    """The Ray Serve application of `realm-nb serve --ray` (Runtime replicas behind Ingress)."""
    require_ray()
    from ray import serve

    from .ray_routing import TenantRouter

    check_ray_flags(args)
    limits = limits_from_args(args)
    scale: dict[str, Any] = {"num_replicas": args.replicas or 1}
    if args.min_replicas is not None:
        # Serve's autoscaler compares ongoing requests per replica (running and queued) with
        # the target: one replica decodes about this many streams at once at its best rate
        # (README: the aggregate tok/s levels off near 16 tenants on 2 cores).
        scale = {"autoscaling_config": {
            "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
            "initial_replicas": max(args.min_replicas, 1),
            "target_ongoing_requests": args.target_ongoing_requests}}
    runtime = serve.deployment(
        name=RUNTIME, max_ongoing_requests=RUNTIME_MAX_ONGOING,
        ray_actor_options={"num_cpus": args.replica_cpus},
        request_router_config={"request_router_class": TenantRouter},
        graceful_shutdown_timeout_s=DRAIN_ON_STOP_S, **scale)(Runtime)
    ingress = serve.deployment(
        name=INGRESS, num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0})(serve.ingress()(Ingress))
    flags = {name: getattr(args, name, None) for name in APP_FLAGS}
    return ingress.bind(runtime.bind(flags, keys), keys, limits.max_body_bytes)


def deploy(args: argparse.Namespace, keys: dict[str, KeyConfig] | None) -> str:
    """Deploy onto the Ray cluster this process is connected to; returns the base URL once
    every replica has loaded its models."""
    from ray import serve

    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(build_application(args, keys), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # Serve's word for "the replicas did not start" (DEPLOY_FAILED)
        raise RealmError(
            f"Ray Serve could not start the realm-nb replicas ({str(e).rstrip('.')}): "
            f"{_failure_of(serve)}; each replica's log is in the Ray session's logs/serve/ "
            "folder (on this machine: /tmp/ray/session_latest/logs/serve/)") from None
    return f"http://{args.host}:{args.port}"


def _failure_of(serve: Any) -> str:
    """The last line of what Serve recorded about the failed deployments (the replica
    constructor's exception, e.g. a model that does not exist), or a pointer to the logs."""
    with contextlib.suppress(Exception):
        app = serve.status().applications[APP_NAME]
        for name, d in app.deployments.items():
            lines = [ln.strip() for ln in str(d.message).splitlines() if ln.strip()]
            if lines and str(d.status) != "HEALTHY":
                return f"{name}: {lines[-1]}"
    return "see the replicas' logs"


def serve_on_ray(args: argparse.Namespace) -> int:
    """`realm-nb serve --ray`: start (or join, --ray-address) a Ray cluster, deploy, serve until
    interrupted (or the --parent-pid owner is gone), then take the application down."""
    local = args.ray_address is None and not os.environ.get("RAY_ADDRESS")
    if local:  # a cluster this command starts and ends: it reports nothing to anyone
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local and _is_loopback(args.host):
        # Ray names a node by the machine's outward address unless told otherwise; a server on
        # loopback should start a cluster that stays on loopback too.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    require_ray()
    check_ray_flags(args)
    keys = load_keys(args.api_keys) if args.api_keys else None  # a bad file fails before Ray
    limits_from_args(args)
    import ray
    from ray import serve

    if local:
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=args.ray_address, log_to_driver=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if local:
            check_capacity(args, float(ray.cluster_resources().get("CPU", 0)))
        url = deploy(args, keys)
        count = (f"{args.replicas or 1} replica(s)" if args.min_replicas is None else
                 f"{args.min_replicas}..{args.max_replicas} replicas, autoscaled")
        print(f"realm-nb: serving {', '.join(args.models or [catalogue.DEFAULT_MODEL])} at "
              f"{url}/v1 on Ray Serve ({count}, tenants sticky to one replica each)",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if args.parent_pid is not None and os.getppid() != args.parent_pid:
                break
    finally:
        with contextlib.suppress(Exception):
            if local:
                serve.shutdown()
            else:  # a shared cluster: take down our application only
                serve.delete(APP_NAME)
        ray.shutdown()
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
