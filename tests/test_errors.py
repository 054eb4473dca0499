"""The one error family: every class is defined in realm_nb/errors.py and registered by name, so
that server mode raises the very class local mode raises."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from typing import Any

import httpx
import pytest

import realm_nb
from realm_nb.errors import ERROR_CLASSES, GuestError, RealmError, error_from_payload


def _family(cls: type[RealmError]) -> set[type[RealmError]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _family(sub)
    return found


def _import_every_module() -> None:
    for info in pkgutil.walk_packages(realm_nb.__path__, "realm_nb."):
        if not info.name.endswith("__main__"):  # running it would run the CLI
            importlib.import_module(info.name)


def test_every_error_class_is_defined_in_errors_py_and_registered() -> None:
    _import_every_module()  # a class defined elsewhere exists only once its module is imported
    family = _family(RealmError)
    elsewhere = sorted(f"{c.__module__}.{c.__name__}" for c in family
                       if c.__module__ != "realm_nb.errors")
    assert not elsewhere, (f"RealmError subclasses defined outside realm_nb/errors.py: "
                           f"{elsewhere}; define them in errors.py (and js/src/errors.ts)")
    assert {ERROR_CLASSES[c.__name__] for c in family} == family
    assert len(ERROR_CLASSES) == len(family)  # no two classes share a name


def test_a_payload_names_its_class_and_keeps_its_fields() -> None:
    err = GuestError("the guest ended the request with -5", abi_code=-5, param="request")
    back = error_from_payload(err.to_payload(), err.status_code)
    assert type(back) is GuestError
    assert (back.message, back.abi_code, back.details["param"]) == (err.message, -5, "request")


@pytest.fixture(scope="module")
def raising_server():
    """A real server (create_app over a real, empty RealmKernel, under uvicorn) with one extra
    route that raises the RealmError class it is named, so each goes through the app's real
    middleware, exception handlers and error bodies."""
    from realm_nb.kernel import RealmKernel
    from realm_nb.server import BackgroundServer, create_app

    app = create_app(RealmKernel())

    @app.get("/v1/test/raise/{name}")
    async def raise_named(name: str) -> dict[str, Any]:
        cls = ERROR_CLASSES[name]
        extra = {field: -5 for field in cls.payload_fields}
        raise cls(f"raised {name} on purpose", param="probe", **extra)

    with BackgroundServer(app) as srv:
        yield srv


# A client process of its own, as in server mode: it imports the SDK's HTTP client only, never
# the runtime (no tenants, no wasmtime), so the classes it rebuilds come from the registry alone.
CLIENT = """
import json, sys
from realm_nb.client import HttpBackend
from realm_nb.errors import RealmError
backend = HttpBackend(sys.argv[1])
seen = {}
for name in json.loads(sys.argv[2]):
    try:
        backend.request("GET", "/v1/test/raise/" + name)
        seen[name] = None
    except RealmError as e:
        seen[name] = [type(e).__module__, type(e).__name__, e.message, e.details.get("param"),
                      getattr(e, "abi_code", None)]
print(json.dumps({"seen": seen, "runtime": sorted(m for m in ("realm_nb.tenants", "wasmtime",
                                                              "jax") if m in sys.modules)}))
"""


def test_each_error_class_round_trips_through_a_real_server(raising_server) -> None:
    names = sorted(ERROR_CLASSES)
    for name in names:  # the status each class stands for is the one the server answers
        status = httpx.get(f"{raising_server.url}/v1/test/raise/{name}").status_code
        assert status == ERROR_CLASSES[name].status_code, name
    out = subprocess.run([sys.executable, "-c", CLIENT, raising_server.url, json.dumps(names)],
                         capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    assert report["runtime"] == [], "the client process imported the runtime"
    for name in names:
        expected = ["realm_nb.errors", name, f"raised {name} on purpose", "probe",
                    -5 if ERROR_CLASSES[name].payload_fields else None]
        assert report["seen"][name] == expected, name
