"""Registry errors: exceptions carrying (status, code, message), rendered once, centrally."""

from __future__ import annotations

import json
from typing import Any


class RegistryError(Exception):
    """An error the client is told about in the distribution spec's JSON format."""

    status: int = 500
    code: str = "UNKNOWN"

    def __init__(self, message: str, detail: Any = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status
        self.headers: dict[bytes, bytes] = {}

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class NameInvalid(RegistryError):
    status = 400
    code = "NAME_INVALID"


class TagInvalid(RegistryError):
    status = 400
    code = "TAG_INVALID"


class DigestInvalid(RegistryError):
    status = 400
    code = "DIGEST_INVALID"


class RangeInvalid(RegistryError):
    status = 416
    code = "RANGE_INVALID"


class NameUnknown(RegistryError):
    status = 404
    code = "NAME_UNKNOWN"


class ManifestUnknown(RegistryError):
    status = 404
    code = "MANIFEST_UNKNOWN"


class BlobUnknown(RegistryError):
    status = 404
    code = "BLOB_UNKNOWN"


class Unsupported(RegistryError):
    status = 405
    code = "UNSUPPORTED"


class Unauthorized(RegistryError):
    status = 401
    code = "UNAUTHORIZED"


class Denied(RegistryError):
    status = 403
    code = "DENIED"


class TooManyRequests(RegistryError):
    status = 429
    code = "TOOMANYREQUESTS"


class Unavailable(RegistryError):
    status = 503
    code = "UNAVAILABLE"


class ManifestInvalid(RegistryError):
    status = 400
    code = "MANIFEST_INVALID"


class PaginationInvalid(RegistryError):
    status = 400
    code = "PAGINATION_NUMBER_INVALID"
