"""`Realm`: the Python SDK, one API over two backends.

- local: the in-process `RealmKernel` (shared by every local `Realm` of the process, so tenants
  on one model share one copy of the weights);
- server: a realm-nb server over HTTP (`realm_nb.client.HttpBackend`);
- auto (the default): the runtime this process can find (`runtime.find_runtime`: an endpoint
  given or in REALM_NB_ENDPOINT, the runtime of the Jupyter server that started this kernel, ...),
  else local. In a notebook of a Jupyter server with realm-nb installed that is the server's
  shared runtime: the kernel imports neither JAX nor wasmtime, and the notebook is its own tenant.

Both backends return the same types (`Generation`, `ModelInfo`, a stream of text pieces) and raise
the same `RealmError` classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol, overload

from .catalogue import DEFAULT_MODEL
from .errors import InvalidRequestError, ModelNotFoundError, RealmError
from .runtime import API_KEY_ENVS, DEFAULT_TENANT, env_value, find_runtime, notebook_tenant
from .types import Generation, ModelInfo, SamplingParams, check_layout

Mode = Literal["local", "server", "auto"]
SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                 "repeat_window", "seed", "stop")


ProgressFn = Callable[[dict[str, Any]], None]


class Stream(Protocol):
    """A running generation: iterate for text pieces; `.generation` once done."""

    generation: Generation | None
    on_progress: ProgressFn | None

    def __iter__(self) -> Iterator[str]: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...
    def result(self, timeout: float | None = None) -> Generation: ...


class Backend(Protocol):
    def models(self) -> list[ModelInfo]: ...
    def load_model(self, source: str, name: str | None, weights: str | None) -> ModelInfo: ...
    def unload_model(self, name: str) -> ModelInfo: ...
    def generate(self, *, tenant: str, model: str, prompt: str | list[int],
                 params: SamplingParams, echo: bool, logprobs: int | None,
                 weights: str | None) -> Stream: ...
    def chat(self, *, tenant: str, model: str, messages: list[dict[str, Any]],
             params: SamplingParams, logprobs: int | None, weights: str | None) -> Stream: ...
    def cancel(self, tenant: str) -> int: ...
    def stats(self) -> dict[str, Any]: ...


class LocalBackend:
    """The in-process kernel."""

    def __init__(self, mesh: Any = None) -> None:
        from .kernel import RealmKernel

        self.kernel = RealmKernel.shared(mesh=mesh)

    def models(self) -> list[ModelInfo]:
        return self.kernel.models()

    def load_model(self, source: str, name: str | None, weights: str | None) -> ModelInfo:
        return self.kernel.load_model(source, name=name, weights=weights)

    def unload_model(self, name: str) -> ModelInfo:
        return self.kernel.unload_model(name)

    def generate(self, *, tenant: str, model: str, prompt: str | list[int],
                 params: SamplingParams, echo: bool, logprobs: int | None,
                 weights: str | None) -> Stream:
        return self.kernel.generate(tenant=tenant, model=model, prompt=prompt, params=params,
                                    echo=echo, logprobs=logprobs, weights=weights)

    def chat(self, *, tenant: str, model: str, messages: list[dict[str, Any]],
             params: SamplingParams, logprobs: int | None, weights: str | None) -> Stream:
        prompt = self.kernel.render_chat(model, messages, weights=weights)
        return self.kernel.generate(tenant=tenant, model=model, prompt=prompt, params=params,
                                    logprobs=logprobs, weights=weights)

    def cancel(self, tenant: str) -> int:
        return self.kernel.cancel(tenant)

    def stats(self) -> dict[str, Any]:
        return self.kernel.stats()


class Realm:
    """Generate text with GGUF models, locally or through a realm-nb server."""

    def __init__(self, mode: Mode = "auto", *, default_model: str | None = None,
                 endpoint: str | None = None, api_key: str | None = None,
                 tenant: str | None = None, weights: str | None = None,
                 timeout: float = 600.0, mesh: Any = None) -> None:
        """tenant: this client's tenant; default the notebook's path in Jupyter, else
        "default". On a server with keys, a plain key acts as its own tenant only.
        mesh (local mode): the devices the in-process runtime spreads models over, e.g.
        'model=2,data=1' (default REALM_NB_MESH, else all local devices); a server's mesh is
        its own (`realm-nb serve --mesh`)."""
        if mode not in ("local", "server", "auto"):
            raise InvalidRequestError(f"mode={mode!r}: choose 'local', 'server' or 'auto'",
                                      param="mode")
        if weights is not None:
            check_layout(weights)
        found = None
        if endpoint is None and mode != "local":
            found = find_runtime()
            if found is not None:
                endpoint = found.url
                api_key = api_key or found.api_key
        if mode == "auto":
            mode = "server" if endpoint else "local"
        self.mode: Mode = mode
        self.runtime = found
        key = api_key or env_value(API_KEY_ENVS)
        # The notebook names its tenant where the key speaks for many (the runtime a Jupyter
        # server owns, or a server without keys); a plain key acts as its own tenant only.
        speaks_for_many = key is None or (found is not None and found.names_tenants
                                          and key == found.api_key)
        derived = notebook_tenant() if speaks_for_many else None
        named = tenant or derived  # None in server mode: the server's choice (the key's tenant)
        # The tenant as the server runs us is asked for when first wanted (`tenant`).
        self._tenant: str | None = named or (None if mode == "server" else DEFAULT_TENANT)
        self.weights = weights
        self.endpoint = endpoint
        self.default_model: str = (default_model or os.environ.get("REALM_MODEL")
                                   or DEFAULT_MODEL)
        self._streams: list[Stream] = []
        self._backend: Backend
        if mode == "server" and mesh is not None:
            raise InvalidRequestError(
                f"mesh={mesh!r} applies to the in-process runtime (mode='local'); a server "
                "runs on its own mesh: start it with `realm-nb serve --mesh ...`", param="mesh")
        if mode == "server":
            if not endpoint:
                raise InvalidRequestError(
                    "mode='server' needs endpoint='http://host:port' (or REALM_NB_ENDPOINT)",
                    param="endpoint")
            from .client import HttpBackend

            self._backend = HttpBackend(endpoint, api_key=key, timeout=timeout, tenant=named)
        else:
            self._backend = LocalBackend(mesh)

    def __repr__(self) -> str:  # never shows the key; never fails for want of the server
        where = self.endpoint if self.mode == "server" else "this process"
        try:
            tenant = repr(self.tenant)
        except RealmError:
            tenant = "(the key's, server unreachable)"
        return (f"Realm(mode={self.mode!r}, default_model={self.default_model!r}, "
                f"tenant={tenant}, {where})")

    @property
    def tenant(self) -> str:
        """The tenant this client runs as: the one it names (the notebook's, or `tenant=`), or,
        with a plain key on a server, the key's tenant as the server reports it (asked once)."""
        if self._tenant is None:
            self._tenant = str(self._backend.stats()["tenant"])
        return self._tenant

    @property
    def model(self) -> str:
        """Alias of `default_model` (the model calls use when they name none)."""
        return self.default_model

    @model.setter
    def model(self, name: str) -> None:
        self.default_model = name

    # ------------------------------------------------------------------ models

    def models(self) -> list[ModelInfo]:
        return self._backend.models()

    def load_model(self, source: str, name: str | None = None) -> str:
        """Load a catalogue name or .gguf path; returns the model id."""
        return self._backend.load_model(source, name, self.weights).id

    def use_model(self, name_or_id: str) -> ModelInfo:
        """Make a model the default for later calls (it loads on first use if needed).

        name_or_id: a name, alias or id that `models()` lists; anything else raises
        `ModelNotFoundError` naming the known models. Returns that model's `ModelInfo`.
        """
        if not isinstance(name_or_id, str) or not name_or_id.strip():
            raise InvalidRequestError(f"use_model needs a model name, got {name_or_id!r}",
                                      param="model")
        models = self.models()
        info = next((m for m in models if name_or_id in (m.name, m.id, *m.aliases)), None)
        if info is None:
            raise ModelNotFoundError(
                f"unknown model {name_or_id!r}; known: {', '.join(m.name for m in models)} "
                "(a .gguf file: load_model(PATH, name=NAME) first)", param="model")
        self.default_model = name_or_id
        return info

    def unload_model(self, name: str) -> None:
        self._backend.unload_model(name)

    # ------------------------------------------------------------------ generation

    @overload
    def generate(self, prompt: str | list[int], model: str | None = None,
                 stream: Literal[False] = False, *, echo: bool = False,
                 logprobs: int | None = None, on_progress: ProgressFn | None = None,
                 **sampling: Any) -> Generation: ...
    @overload
    def generate(self, prompt: str | list[int], model: str | None, stream: Literal[True], *,
                 echo: bool = False, logprobs: int | None = None,
                 on_progress: ProgressFn | None = None, **sampling: Any) -> Stream: ...
    @overload
    def generate(self, prompt: str | list[int], model: str | None = None, *,
                 stream: Literal[True], echo: bool = False, logprobs: int | None = None,
                 on_progress: ProgressFn | None = None, **sampling: Any) -> Stream: ...
    @overload
    def generate(self, prompt: str | list[int], model: str | None = None, stream: bool = False,
                 *, echo: bool = False, logprobs: int | None = None,
                 on_progress: ProgressFn | None = None,
                 **sampling: Any) -> Generation | Stream: ...

    def generate(self, prompt: str | list[int], model: str | None = None, stream: bool = False,
                 *, echo: bool = False, logprobs: int | None = None,
                 on_progress: ProgressFn | None = None,
                 **sampling: Any) -> Generation | Stream:
        """Complete `prompt` (text or token ids). stream=True returns an iterator of pieces.

        on_progress: called with cold-start events before the first piece
        (`{"stage": "loading", "done": i, "total": n}`, `{"stage": "compiling"}`).
        """
        params = _params(sampling)
        s = self._backend.generate(tenant=self._tenant or "", model=model or self.default_model,
                                   prompt=prompt, params=params, echo=echo, logprobs=logprobs,
                                   weights=self.weights)
        return self._finish(s, stream, on_progress)

    @overload
    def chat(self, messages: list[dict[str, Any]], model: str | None = None,
             stream: Literal[False] = False, *, logprobs: int | None = None,
             on_progress: ProgressFn | None = None, **sampling: Any) -> Generation: ...
    @overload
    def chat(self, messages: list[dict[str, Any]], model: str | None, stream: Literal[True], *,
             logprobs: int | None = None, on_progress: ProgressFn | None = None,
             **sampling: Any) -> Stream: ...
    @overload
    def chat(self, messages: list[dict[str, Any]], model: str | None = None, *,
             stream: Literal[True], logprobs: int | None = None,
             on_progress: ProgressFn | None = None, **sampling: Any) -> Stream: ...
    @overload
    def chat(self, messages: list[dict[str, Any]], model: str | None = None,
             stream: bool = False, *, logprobs: int | None = None,
             on_progress: ProgressFn | None = None,
             **sampling: Any) -> Generation | Stream: ...

    def chat(self, messages: list[dict[str, Any]], model: str | None = None,
             stream: bool = False, *, logprobs: int | None = None,
             on_progress: ProgressFn | None = None,
             **sampling: Any) -> Generation | Stream:
        """Reply to a conversation, formatted with the model's own chat template."""
        params = _params(sampling)
        s = self._backend.chat(tenant=self._tenant or "", model=model or self.default_model,
                               messages=messages, params=params, logprobs=logprobs,
                               weights=self.weights)
        return self._finish(s, stream, on_progress)

    def _finish(self, s: Stream, stream: bool,
                on_progress: ProgressFn | None) -> Generation | Stream:
        s.on_progress = on_progress
        if stream:
            self._streams = [x for x in self._streams if x.generation is None]
            self._streams.append(s)
            return s
        return s.result()

    def cancel(self) -> int:
        """Stop this tenant's running generations (their partial text is kept); returns how
        many were running. The runtime is asked first, so that its count includes this Realm's
        own streams (cancelled one by one beforehand, they left it nothing to count)."""
        n = self._backend.cancel(self._tenant or "")
        for s in self._streams:
            s.cancel()  # a no-op for those the runtime just stopped
        return n

    def stats(self) -> dict[str, Any]:
        return self._backend.stats()


def _params(sampling: dict[str, Any]) -> SamplingParams:
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise InvalidRequestError(
            f"unknown parameter(s) {unknown}; sampling parameters are {list(SAMPLING_KEYS)}",
            param=unknown[0])
    return SamplingParams(**sampling)  # it normalises and checks stop (str, list or None)
