"""The errors of the HTTP layer, each carrying the status code a client gets with its sentence.

Route code raises them; one exception handler in :mod:`cliptune.serve.app` turns every one into
``{"detail": "<the message>"}`` with its status, so no route builds an error response by hand.
"""

from __future__ import annotations

from cliptune.errors import CliptuneError

__all__ = [
    "BadQueryError",
    "NotAnImageError",
    "NotFoundError",
    "RequestError",
    "ServeError",
    "UnsupportedBodyError",
    "UploadTooLargeError",
]


class ServeError(CliptuneError, ValueError):
    """The server cannot start as asked (limits, index, suite); the message names the reason."""


class RequestError(CliptuneError):
    """A request the server refuses; ``status`` is the HTTP status, the message the response's detail."""

    status = 400


class BadQueryError(RequestError):
    """The query is empty, too long, ambiguous, or asks for an unknown filter or too many hits."""

    status = 422


class NotFoundError(RequestError):
    """No such item (or page) here."""

    status = 404


class UploadTooLargeError(RequestError):
    """The request body or the uploaded image exceeds ``Limits.max_upload_bytes``."""

    status = 413


class NotAnImageError(RequestError):
    """The upload does not decode as an image (whatever its name or content type says), or is a bomb."""

    status = 415


class UnsupportedBodyError(RequestError):
    """A body that is neither JSON nor a multipart form."""

    status = 415
