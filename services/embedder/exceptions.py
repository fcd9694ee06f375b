"""The engine layer's domain exceptions (no gRPC here: services/embedder/errors.py maps them)."""

from __future__ import annotations


class EmbedderError(Exception):
    """Base of every error the engine reports to a caller."""


class InvalidInput(EmbedderError):
    """Bad request data (INVALID_ARGUMENT); `field` is the request field at fault."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class ModelNotFound(EmbedderError):
    """No such model is allowed or can be found locally (NOT_FOUND)."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r} not found: {reason}")
        self.model = model
        self.reason = reason


class ModelUnavailable(EmbedderError):
    """The model exists but cannot be loaded (FAILED_PRECONDITION)."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r} cannot be loaded: {reason}")
        self.model = model
        self.reason = reason


class ModelTooLarge(EmbedderError):
    """The model does not fit the memory budget even with every other model evicted."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r} does not fit: {reason}")
        self.model = model
        self.reason = reason


class Overloaded(EmbedderError):
    """Admission refused (RESOURCE_EXHAUSTED); the caller may retry after `retry_after_s`."""

    def __init__(self, description: str, retry_after_s: float) -> None:
        super().__init__(description)
        self.description = description
        self.retry_after_s = retry_after_s


class ShuttingDown(EmbedderError):
    """The server is draining (UNAVAILABLE)."""
