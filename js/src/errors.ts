/**
 * The one error family of realm-nb, mirroring the Python SDK's `realm_nb.errors`.
 *
 * A server error body is OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`, where
 * `type` is the name of the Python class that was raised. `errorFromPayload` turns it into the
 * class of the same name here, so `catch (e) { if (e instanceof ModelNotFoundError) ... }` reads
 * the same in both SDKs. A test checks this table against the Python classes (names, parents,
 * statuses, codes), so the two families cannot drift apart silently.
 *
 * Class names are spelled out in `static type` (not taken from `constructor.name`), so they
 * survive minifiers that rename classes.
 */

export interface RealmErrorOptions {
  /** The request field or header that was wrong (`"model"`, `"Authorization"`, ...). */
  param?: string | null | undefined;
  /** The HTTP status the server answered with (default: the class's own). */
  status?: number | undefined;
  /** Seconds to wait before retrying (from a 429's `Retry-After`). */
  retryAfter?: number | undefined;
  cause?: unknown;
}

/** Base of every error realm-nb raises on purpose. */
export class RealmError extends Error {
  static readonly type: string = "RealmError";
  static readonly status: number = 500;
  static readonly code: string = "realm_error";

  /** The Python class name (`"ModelNotFoundError"`), as in the server's error body. */
  readonly type: string;
  /** HTTP status (the server's answer, else the class's usual one). */
  readonly status: number;
  /** OpenAI-style error code (`"model_not_found"`). */
  readonly code: string;
  readonly param: string | null;
  readonly retryAfter: number | null;

  constructor(message: string, options: RealmErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    const cls = new.target as typeof RealmError;
    this.name = cls.type;
    this.type = cls.type;
    this.status = options.status ?? cls.status;
    this.code = cls.code;
    this.param = options.param ?? null;
    this.retryAfter = options.retryAfter ?? null;
  }
}

// --- format layer ------------------------------------------------------------------------------

/** A file is not a GGUF file the runtime can read. */
export class GGUFFormatError extends RealmError {
  static override readonly type: string = "GGUFFormatError";
  static override readonly status: number = 400;
  static override readonly code: string = "invalid_model_file";
}

export class UnsupportedArchitectureError extends GGUFFormatError {
  static override readonly type: string = "UnsupportedArchitectureError";
  static override readonly code: string = "unsupported_architecture";
}

export class UnsupportedTensorTypeError extends GGUFFormatError {
  static override readonly type: string = "UnsupportedTensorTypeError";
  static override readonly code: string = "unsupported_tensor_type";
}

export class MissingTensorError extends GGUFFormatError {
  static override readonly type: string = "MissingTensorError";
  static override readonly code: string = "missing_tensor";
}

export class ShapeMismatchError extends GGUFFormatError {
  static override readonly type: string = "ShapeMismatchError";
  static override readonly code: string = "shape_mismatch";
}

export class TokenizerError extends RealmError {
  static override readonly type: string = "TokenizerError";
  static override readonly status: number = 400;
  static override readonly code: string = "tokenizer_error";
}

export class ChatTemplateError extends RealmError {
  static override readonly type: string = "ChatTemplateError";
  static override readonly status: number = 400;
  static override readonly code: string = "chat_template_error";
}

/** A chat template ran past its time or size budget (a loop that never ends, a huge string). */
export class ChatTemplateBudgetError extends ChatTemplateError {
  static override readonly type: string = "ChatTemplateBudgetError";
  static override readonly code: string = "chat_template_budget_exceeded";
}

// --- models and requests -------------------------------------------------------------------------

export class ModelNotFoundError extends RealmError {
  static override readonly type: string = "ModelNotFoundError";
  static override readonly status: number = 404;
  static override readonly code: string = "model_not_found";
}

export class PullError extends RealmError {
  static override readonly type: string = "PullError";
  static override readonly status: number = 502;
  static override readonly code: string = "pull_failed";
}

/** A request parameter has a bad value (negative maxTokens, topP of 3, an unknown option). */
export class InvalidRequestError extends RealmError {
  static override readonly type: string = "InvalidRequestError";
  static override readonly status: number = 400;
  static override readonly code: string = "invalid_request_error";
}

export class ContextLengthError extends InvalidRequestError {
  static override readonly type: string = "ContextLengthError";
  static override readonly code: string = "context_length_exceeded";
}

/** A model cannot be unloaded or renamed now: requests are running on it. */
export class ModelInUseError extends InvalidRequestError {
  static override readonly type: string = "ModelInUseError";
  static override readonly status: number = 409;
  static override readonly code: string = "model_in_use";
}

/** A model name already stands for another file (names are never silently rebound). */
export class ModelNameTakenError extends InvalidRequestError {
  static override readonly type: string = "ModelNameTakenError";
  static override readonly status: number = 409;
  static override readonly code: string = "model_name_taken";
}

/** The request body is larger than the server accepts. */
export class RequestTooLargeError extends InvalidRequestError {
  static override readonly type: string = "RequestTooLargeError";
  static override readonly status: number = 413;
  static override readonly code: string = "request_too_large";
}

/** A state-changing request whose body is not JSON. */
export class UnsupportedMediaTypeError extends InvalidRequestError {
  static override readonly type: string = "UnsupportedMediaTypeError";
  static override readonly status: number = 415;
  static override readonly code: string = "unsupported_media_type";
}

export class QueueFullError extends RealmError {
  static override readonly type: string = "QueueFullError";
  static override readonly status: number = 503;
  static override readonly code: string = "queue_full";
}

export class MemoryBudgetError extends RealmError {
  static override readonly type: string = "MemoryBudgetError";
  static override readonly status: number = 507;
  static override readonly code: string = "memory_budget_exceeded";
}

/** A generation's stream was iterated from a second thread while another reads it (Python). */
export class StreamBusyError extends RealmError {
  static override readonly type: string = "StreamBusyError";
  static override readonly status: number = 409;
  static override readonly code: string = "stream_busy";
}

// --- the sandbox ---------------------------------------------------------------------------------

/** A tenant's WebAssembly guest trapped (out of fuel, memory limit, bad pointer, host error). */
export class GuestTrap extends RealmError {
  static override readonly type: string = "GuestTrap";
  static override readonly status: number = 500;
  static override readonly code: string = "guest_trap";
}

export class AbiVersionError extends RealmError {
  static override readonly type: string = "AbiVersionError";
  static override readonly status: number = 500;
  static override readonly code: string = "abi_version_mismatch";
}

/** The request was cancelled (client gone, Stop pressed) before or while it ran. */
export class Cancelled extends RealmError {
  static override readonly type: string = "Cancelled";
  static override readonly status: number = 499;
  static override readonly code: string = "cancelled";
}

/** The guest ended a request with an ABI error code that no host exception explains. */
export class GuestError extends RealmError {
  static override readonly type: string = "GuestError";
  static override readonly status: number = 500;
  static override readonly code: string = "guest_error";
}

// --- building the guest and the CPU kernels ------------------------------------------------------

/** The guest could not be built (no Zig, no source, or the compiler failed). */
export class GuestBuildError extends RealmError {
  static override readonly type: string = "GuestBuildError";
  static override readonly status: number = 500;
  static override readonly code: string = "guest_build_failed";
}

/** The CPU kernels could not be built (no Zig, no source, or the compiler failed). */
export class KernelBuildError extends RealmError {
  static override readonly type: string = "KernelBuildError";
  static override readonly status: number = 500;
  static override readonly code: string = "kernel_build_failed";
}

// --- server mode ---------------------------------------------------------------------------------

export class AuthenticationError extends RealmError {
  static override readonly type: string = "AuthenticationError";
  static override readonly status: number = 401;
  static override readonly code: string = "invalid_api_key";
}

/** The API key is valid but may not do this (e.g. act as another tenant). */
export class PermissionDeniedError extends RealmError {
  static override readonly type: string = "PermissionDeniedError";
  static override readonly status: number = 403;
  static override readonly code: string = "permission_denied";
}

export class RateLimitError extends RealmError {
  static override readonly type: string = "RateLimitError";
  static override readonly status: number = 429;
  static override readonly code: string = "rate_limit_exceeded";
}

/** No running request of this tenant has that id (finished, or another tenant's). */
export class RequestNotFoundError extends RealmError {
  static override readonly type: string = "RequestNotFoundError";
  static override readonly status: number = 404;
  static override readonly code: string = "request_not_found";
}

/** The runtime cannot be reached, dropped a request, or (local mode) would not start. */
export class ServerConnectionError extends RealmError {
  static override readonly type: string = "ServerConnectionError";
  static override readonly status: number = 503;
  static override readonly code: string = "server_unreachable";
}

/** The Ray Serve replica running a request stopped before it ended (`realm-nb serve --ray`);
 * a retry goes to a live replica. */
export class ReplicaLostError extends RealmError {
  static override readonly type: string = "ReplicaLostError";
  static override readonly status: number = 503;
  static override readonly code: string = "replica_lost";
}

/** A feature needs an optional extra of the Python package that is not installed. */
export class MissingExtraError extends RealmError {
  static override readonly type: string = "MissingExtraError";
  static override readonly status: number = 501;
  static override readonly code: string = "missing_extra";
}

// --- server bodies → classes -------------------------------------------------------------------

/** Every class of the family, base first. */
export const ERROR_CLASSES: readonly (typeof RealmError)[] = [
  RealmError, GGUFFormatError, UnsupportedArchitectureError, UnsupportedTensorTypeError,
  MissingTensorError, ShapeMismatchError, TokenizerError, ChatTemplateError,
  ChatTemplateBudgetError, ModelNotFoundError, PullError, InvalidRequestError, ContextLengthError,
  ModelInUseError, ModelNameTakenError, RequestTooLargeError, UnsupportedMediaTypeError,
  QueueFullError, MemoryBudgetError, StreamBusyError, GuestTrap, AbiVersionError, Cancelled,
  GuestError, GuestBuildError, KernelBuildError, AuthenticationError, PermissionDeniedError, RateLimitError, RequestNotFoundError,
  ServerConnectionError, ReplicaLostError, MissingExtraError,
];

const BY_TYPE = new Map<string, typeof RealmError>(ERROR_CLASSES.map((c) => [c.type, c]));

/** The class for a status when the body names none we know (as the Python SDK does). */
const BY_STATUS = new Map<number, typeof RealmError>([
  [400, InvalidRequestError],
  [401, AuthenticationError],
  [403, PermissionDeniedError],
  [404, ModelNotFoundError],
  [413, RequestTooLargeError],
  [415, UnsupportedMediaTypeError],
  [422, InvalidRequestError],
  [429, RateLimitError],
]);

/**
 * Rebuild the error a server answered with: the class named by the body's `type`, else one
 * chosen by the HTTP status. `status` is the HTTP status (for an error event inside a stream,
 * pass undefined: the class's own status is used).
 */
export function errorFromPayload(payload: unknown, status?: number,
                                 retryAfter?: number): RealmError {
  const outer = isRecord(payload) ? payload : {};
  const err = isRecord(outer["error"]) ? outer["error"] : outer;
  const type = typeof err["type"] === "string" ? err["type"] : "";
  const message = typeof err["message"] === "string" && err["message"]
    ? err["message"] : `server answered HTTP ${status ?? "error"}`;
  const cls = BY_TYPE.get(type) ?? (status === undefined ? undefined : BY_STATUS.get(status))
    ?? RealmError;
  const param = typeof err["param"] === "string" ? err["param"] : null;
  return new cls(message, { param, status, retryAfter });
}

function isRecord(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x);
}
