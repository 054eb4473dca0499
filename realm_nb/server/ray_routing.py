"""Which runtime replica answers a request under `realm-nb serve --ray`: the tenant's own, while
it lives.

A tenant's state lives in one replica's process: its guests, its sequences' KV pages, its running
requests (which `/v1/requests` lists and `/v1/cancel` stops). Ray Serve's default router (power of
two choices over queue lengths) would send a tenant's next request wherever the queue is shortest,
onto a replica that holds none of that. So the ingress names the tenant in each call
(`tenant_for` reads it off the request the same way the gate does) and `TenantRouter` keeps a home
replica per tenant:

- a tenant with a live home goes there, even when that replica is busy: the request waits in
  Serve's router (which backs off and asks again) rather than move away from its state;
- a new tenant, or one whose home has gone (killed, crashed, scaled down), gets the live replica
  with the fewest tenants homed, ties broken by rendezvous hashing on the tenant and replica ids,
  so that the choice does not depend on the order in which Serve lists replicas.

The homes live in the ingress process (one ingress replica: see `ray_app`); replicas added by
autoscaling take new tenants and leave the others where they are.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from ..runtime import DEFAULT_TENANT
from .auth import TENANT_HEADER, KeyTable, bearer_key

UNKNOWN_KEY = "\x00unknown-key"  # every request with a key we do not know: one replica says 401
MAX_HOMES = 1 << 16  # tenants remembered at once; the longest unseen is forgotten first


def tenant_for(headers: dict[bytes, bytes], keys: KeyTable | None) -> str:
    """The tenant a request acts as, as the gate (`auth.GateMiddleware.caller`) will find it.

    Nothing is refused here: a bad key or a tenant header the key may not use is routed like
    any other, and the replica's gate answers it (401, 403, 400) in the usual way.
    """
    raw = headers.get(TENANT_HEADER)
    named = raw.decode("utf-8", "replace").strip() if raw is not None else ""
    if keys is None:
        return named or DEFAULT_TENANT
    given = bearer_key(headers)
    config = keys.find(given) if given is not None else None
    if config is None:
        return UNKNOWN_KEY
    return named if named and config.name_tenants else config.tenant


def _rendezvous(tenant: str, replica: ReplicaID) -> bytes:
    return hashlib.sha256(f"{tenant}\x00{replica.unique_id}".encode()).digest()


class TenantRouter(RequestRouter):
    """A Ray Serve request router that keeps each tenant on one replica while it lives (see the
    module's docstring). The tenant is the handle call's `tenant` keyword."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.homes: OrderedDict[str, ReplicaID] = OrderedDict()

    def home_of(self, tenant: str, candidates: list[RunningReplica]) -> RunningReplica:
        """The tenant's live home, or a new one: the replica with the fewest tenants homed."""
        live = {r.replica_id: r for r in candidates}
        home = self.homes.get(tenant)
        if home is not None and home in live:
            self.homes.move_to_end(tenant)
            return live[home]
        homed = Counter(h for h in self.homes.values() if h in live)
        chosen = min(candidates, key=lambda r: (homed[r.replica_id],
                                                _rendezvous(tenant, r.replica_id)))
        self.homes[tenant] = chosen.replica_id
        self.homes.move_to_end(tenant)
        while len(self.homes) > MAX_HOMES:
            self.homes.popitem(last=False)
        return chosen

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        tenant = pending_request.kwargs.get("tenant") if pending_request is not None else None
        if not candidate_replicas:
            return []
        if not isinstance(tenant, str):  # not one of ours (Serve's own probes): anywhere
            return [candidate_replicas]
        return [[self.home_of(tenant, candidate_replicas)]]
