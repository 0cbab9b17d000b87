"""One error hierarchy for the whole project.

Every error a user can meet is a subclass of :class:`SiteRecoveryError`. Each class owns its
message template (the docstring's first line is the summary; ``template`` is formatted with the
keyword arguments given at raise time), an exit code for the CLI and an HTTP status for the API.
Vendor exceptions are re-raised as one of these with ``raise ... from err``.

Messages say what was wrong, what is allowed, and what to do.
"""

from __future__ import annotations

from typing import Any


class SiteRecoveryError(Exception):
    """Something went wrong."""

    exit_code: int = 1
    http_status: int = 500
    template: str = "{detail}"

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.fields = fields
        if message is None:
            try:
                message = self.template.format(**fields)
            except (KeyError, IndexError):
                message = self.template
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class InvalidInput(SiteRecoveryError):
    """Input that is not allowed."""

    exit_code = 2
    http_status = 422


class OutOfRange(InvalidInput):
    """A value outside its allowed range."""

    template = "{field} {value} is out of range: allowed is {allowed}."


class NotFound(SiteRecoveryError):
    """A named thing does not exist."""

    exit_code = 3
    http_status = 404
    template = "{kind} {name!r} not found.{hint}"

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        fields.setdefault("hint", "")
        super().__init__(message, **fields)


class AlreadyExists(SiteRecoveryError):
    """A thing with that name exists already."""

    exit_code = 4
    http_status = 409
    template = "{kind} {name!r} already exists.{hint}"

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        fields.setdefault("hint", "")
        super().__init__(message, **fields)


class OperationNotAllowed(SiteRecoveryError):
    """An operation that the item's current state does not allow."""

    exit_code = 5
    http_status = 409
    template = "{operation} is not allowed for {item!r} in state {state}; allowed operations: {allowed}."


class VaultError(SiteRecoveryError):
    """The vault cannot be opened or used."""

    exit_code = 6
    http_status = 500


class DatastoreError(SiteRecoveryError):
    """The datastore cannot be read or written."""

    exit_code = 7
    http_status = 500


class ChunkMissing(DatastoreError):
    """A chunk that an index refers to is not in the chunk store."""

    template = "chunk {chunk_id} is missing from the datastore{where}."

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        fields.setdefault("where", "")
        super().__init__(message, **fields)


class ChunkCorrupt(DatastoreError):
    """A chunk that does not decrypt, decompress or hash to its id."""

    template = "chunk {chunk_id} is corrupt ({reason}){where}."

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        fields.setdefault("where", "")
        super().__init__(message, **fields)


class StorageFull(DatastoreError):
    """No space left where data must be written."""

    exit_code = 8
    http_status = 507
    template = (
        "no space left on {where}: {detail}. Free space there or move the datastore; "
        "existing recovery points are intact."
    )


class SourceError(SiteRecoveryError):
    """A machine's disks cannot be read or controlled."""

    exit_code = 9
    http_status = 502


class TrackingLost(SourceError):
    """Change tracking is lost or inconsistent; a hash resync is needed."""


class HookFailed(SiteRecoveryError):
    """A freeze/thaw or pre/post hook failed."""

    exit_code = 10
    http_status = 502


class JobFailed(SiteRecoveryError):
    """A job failed."""

    exit_code = 11
    http_status = 500
