"""The one error family of realm-nb.

Every error we raise derives from `RealmError` and says what was wrong, the bad value, and what
to do. Each class carries the HTTP status and OpenAI-style `code` the server answers with, so a
server-side error becomes the same class again in the SDK's server mode (see `error_from_payload`).

Every class of the family is defined here, in this one module, so that `ERROR_CLASSES` (the
registry by name that `error_from_payload` reads) holds them all in any process, including a
client that never imports the runtime (a test checks that no module defines another).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar


class RealmError(Exception):
    """Base of every error realm-nb raises on purpose."""

    status_code: int = 500
    code: str = "realm_error"
    payload_fields: ClassVar[tuple[str, ...]] = ()  # details that travel in the error body too

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_payload(self) -> dict[str, Any]:
        """The OpenAI-style error body: {"error": {"message", "type", "code", "param"}}."""
        return {
            "error": {
                "message": self.message,
                "type": type(self).__name__,
                "code": self.code,
                "param": self.details.get("param"),
                **{name: self.details.get(name) for name in self.payload_fields},
            }
        }


# --- format layer ------------------------------------------------------------------------------


class GGUFFormatError(RealmError):
    """A file is not a GGUF file we can read: bad magic, truncated, counts past the end, ..."""

    status_code = 400
    code = "invalid_model_file"


class UnsupportedArchitectureError(GGUFFormatError):
    code = "unsupported_architecture"


class UnsupportedTensorTypeError(GGUFFormatError):
    code = "unsupported_tensor_type"


class MissingTensorError(GGUFFormatError):
    code = "missing_tensor"


class ShapeMismatchError(GGUFFormatError):
    code = "shape_mismatch"


class TokenizerError(RealmError):
    status_code = 400
    code = "tokenizer_error"


class ChatTemplateError(RealmError):
    status_code = 400
    code = "chat_template_error"


class ChatTemplateBudgetError(ChatTemplateError):
    """A chat template ran past its time or size budget (a loop that never ends, a huge string)."""

    code = "chat_template_budget_exceeded"


# --- models and requests -------------------------------------------------------------------------


class ModelNotFoundError(RealmError):
    status_code = 404
    code = "model_not_found"


class PullError(RealmError):
    status_code = 502
    code = "pull_failed"


class InvalidRequestError(RealmError):
    """A request parameter has a bad value (negative max_tokens, top_p of 3, ...)."""

    status_code = 400
    code = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class ModelInUseError(InvalidRequestError):
    """A model cannot be unloaded or renamed now: requests are running on it."""

    status_code = 409
    code = "model_in_use"


class ModelNameTakenError(InvalidRequestError):
    """A model name already stands for another file (names are never silently rebound)."""

    status_code = 409
    code = "model_name_taken"


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts (answered before the body is read)."""

    status_code = 413
    code = "request_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    """A state-changing request whose body is not JSON (e.g. a cross-site form post)."""

    status_code = 415
    code = "unsupported_media_type"


class QueueFullError(RealmError):
    status_code = 503
    code = "queue_full"


class MemoryBudgetError(RealmError):
    status_code = 507
    code = "memory_budget_exceeded"


class StreamBusyError(RealmError):
    """A generation's stream was iterated from a second thread while another thread reads it."""

    status_code = 409
    code = "stream_busy"


# --- the sandbox ---------------------------------------------------------------------------------


class GuestTrap(RealmError):
    """A tenant's WebAssembly guest trapped (out of fuel, memory limit, bad pointer, host error)."""

    status_code = 500
    code = "guest_trap"


class AbiVersionError(RealmError):
    status_code = 500
    code = "abi_version_mismatch"


class Cancelled(RealmError):
    """The request was cancelled (client gone, Stop pressed); the guest sees CANCELLED."""

    status_code = 499
    code = "cancelled"


class GuestError(RealmError):
    """The guest ended a request with an ABI error code that no host exception explains."""

    status_code = 500
    code = "guest_error"
    payload_fields = ("abi_code",)

    def __init__(self, message: str, abi_code: int | None, **details: Any) -> None:
        super().__init__(message, abi_code=abi_code, **details)
        self.abi_code = abi_code  # abi.ErrorCode; None when a server's body did not say


# --- building the guest and the CPU kernels ------------------------------------------------------


class GuestBuildError(RealmError):
    """The guest could not be built (no Zig, no source, or the compiler failed)."""

    code = "guest_build_failed"


class KernelBuildError(RealmError):
    """The CPU kernels could not be built (no Zig, no source, or the compiler failed)."""

    code = "kernel_build_failed"


# --- server mode ---------------------------------------------------------------------------------


class AuthenticationError(RealmError):
    status_code = 401
    code = "invalid_api_key"


class PermissionDeniedError(RealmError):
    """The API key is valid but may not do this (e.g. act as another tenant)."""

    status_code = 403
    code = "permission_denied"


class RateLimitError(RealmError):
    status_code = 429
    code = "rate_limit_exceeded"


class RequestNotFoundError(RealmError):
    """No running request of this tenant has that id (finished, or another tenant's)."""

    status_code = 404
    code = "request_not_found"


class ServerConnectionError(RealmError):
    status_code = 503
    code = "server_unreachable"


class ReplicaLostError(RealmError):
    """The Ray Serve replica running a request stopped before the request ended (`realm-nb
    serve --ray`): that request is lost, and a retry goes to a live replica."""

    status_code = 503
    code = "replica_lost"


class MissingExtraError(RealmError):
    """A feature needs an optional extra of the package that is not installed (`realm-nb serve
    --ray` needs `realm-nb[ray]`); the message names the pip command."""

    status_code = 501
    code = "missing_extra"


# --- the registry: server bodies → classes -------------------------------------------------------


def _family(cls: type[RealmError]) -> Iterator[type[RealmError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _family(sub)


# Every class above, by name (the `type` of an error body). Built once, here, after the last
# class: a class defined in another module would be missing from it in a process that never
# imported that module, which is why there is none.
ERROR_CLASSES: Mapping[str, type[RealmError]] = MappingProxyType(
    {cls.__name__: cls for cls in _family(RealmError)})


def error_from_payload(payload: dict[str, Any], status_code: int) -> RealmError:
    """Rebuild the RealmError a server answered with (SDK server mode raises the same classes)."""
    err = payload.get("error", payload) if isinstance(payload, dict) else {}
    message = str(err.get("message") or f"server answered HTTP {status_code}")
    cls = ERROR_CLASSES.get(str(err.get("type")))
    if cls is None:
        cls = {
            400: InvalidRequestError,
            401: AuthenticationError,
            403: PermissionDeniedError,
            404: ModelNotFoundError,
            413: RequestTooLargeError,
            415: UnsupportedMediaTypeError,
            422: InvalidRequestError,
            429: RateLimitError,
        }.get(status_code, RealmError)
    extra = {name: err.get(name) for name in cls.payload_fields}
    return cls(message, param=err.get("param"), **extra)
