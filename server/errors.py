"""Domain errors: what went wrong, in terms a caller can act on, raised anywhere below the HTTP edge.

Each error carries a stable problem slug, a detail sentence and the HTTP status it suggests (plus, where a
retry helps, after how many seconds), so server/http/problems.py answers every one of them in one handler.
Nothing here knows HTTP: the inference worker and the registry raise these without importing a web framework.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error reported to callers; subclasses fix `slug` and `status`."""

    slug: str = "internal"
    status: int = 500

    def __init__(self, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after  # seconds after which the same request may succeed, when known


# -- resolving a request ------------------------------------------------------------------------------
class UnknownAdapter(DomainError):
    """No adapter (or AdapterFusion) of that name exists for this tenant, own or shared."""

    slug, status = "unknown-adapter", 404


class InvalidComposition(DomainError):
    """The composition cannot be parsed, validated or run with these adapters."""

    slug, status = "invalid-composition", 422


class StaleFusion(DomainError):
    """An AdapterFusion names an adapter version that is gone."""

    slug, status = "stale-fusion", 422


class InvalidHead(DomainError):
    """The requested prediction head does not exist or does not fit the task."""

    slug, status = "invalid-head", 422


class NoInputs(DomainError):
    slug, status = "no-inputs", 422


class TooManyInputs(DomainError):
    slug, status = "too-many-inputs", 413


class InputTooLong(DomainError):
    slug, status = "input-too-long", 422


class InvalidInput(DomainError):
    """An input the model cannot take (a lone surrogate, a token id outside the vocabulary) or a field value it
    does not support."""

    slug, status = "invalid-input", 422


class OverLimit(DomainError):
    """The request asks for more than a configured limit allows (cost, composition size, response size); the
    detail names the limit, its value and the request's."""

    slug, status = "over-limit", 413


# -- queueing and running -----------------------------------------------------------------------------
class QueueFull(DomainError):
    """The inference queue is at capacity; retry after `retry_after` seconds."""

    slug, status = "queue-full", 429


class Draining(DomainError):
    """The server is shutting down: it takes no new work, or stopped before this request ran."""

    slug, status = "draining", 503


class DeadlineExceeded(DomainError):
    """The request waited past its deadline and was dropped before it ran."""

    slug, status = "deadline-exceeded", 504


class AdapterUnavailable(DomainError):
    """An adapter could not be loaded into the model (deleted, corrupt, or rejected by the model)."""

    slug, status = "adapter-unavailable", 503


class InferenceFailed(DomainError):
    """The forward pass raised something that is not the caller's fault."""

    slug, status = "inference-failed", 500


# -- generation ---------------------------------------------------------------------------------------
class GenerationUnsupported(DomainError):
    """The backbone, the composition or a parameter cannot be used to generate text."""

    slug, status = "generation-unsupported", 422


class ContextTooLong(DomainError):
    """prompt + max_tokens do not fit the backbone's context (or the KV cache budget)."""

    slug, status = "context-length-exceeded", 422


class InvalidGenerationRequest(DomainError):
    """Messages, sampling parameters or stop strings that are out of range."""

    slug, status = "invalid-generation-request", 422


# -- uploads ------------------------------------------------------------------------------------------
class UploadRejected(DomainError):
    """An upload failed a check; the check names its own slug and status (422 invalid, 413 too large, 415 pickle)."""

    def __init__(self, status: int, slug: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug


class InvalidName(DomainError):
    """An adapter name that the store cannot hold, or a form name that contradicts the URL."""

    slug, status = "invalid-name", 422


class QuotaExceeded(DomainError):
    """The tenant's adapter count or storage quota would be exceeded."""

    slug, status = "quota-exceeded", 403
