"""The client's errors: one type, with a subclass per status a caller handles differently."""
from typing import Optional

import grpc


class ImagelshError(Exception):
    """A call failed; `code` is the gRPC status code (None for a failure on this side)."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(ImagelshError):
    """The index (or item) does not exist."""


class AlreadyExists(ImagelshError):
    """An index of that name exists already."""


class InvalidArgument(ImagelshError):
    """The request breaks a rule of the API or one of the server's bounds; it fails the same way again."""


class Unauthenticated(ImagelshError):
    """The token is missing or unknown."""


class PermissionDenied(ImagelshError):
    """The token's role may not make this call."""


class Unavailable(ImagelshError):
    """The server was away or busy, and stayed so through every retry."""


class ImagesRefused(ImagelshError):
    """Some images of an `embed` call were refused; `refused` lists them, `embeddings` holds the
    others' embeddings (None where refused)."""

    def __init__(self, refused, embeddings):
        super().__init__(f"{len(refused)} image(s) refused, first: {refused[0].reason}")
        self.refused = refused
        self.embeddings = embeddings


_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
}


def from_rpc_error(error: grpc.RpcError) -> ImagelshError:
    """The client error for a failed call (the status's code decides, never its text)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    kind = _BY_CODE.get(code, ImagelshError)
    name = code.name if code is not None else "UNKNOWN"
    return kind(f"{name}: {details}", code)
