"""The admin API of a running mirror, for ``regmirror purge`` and ``regmirror fsck
--repair``: served on a unix socket (``ROOT/_state/admin.sock``, mode 0600: root and the
mirror's user only; ``regmirror.app.admin``), never on the public listener, so no client
of the fleet can remove anything.

- ``GET /``: ``{"pid": ..., "root": ...}`` (the CLI's "is a mirror running here");
- ``POST /purge`` with ``{"digest": ...}`` or ``{"upstream", "repository", "tag"}``:
  ``regmirror.expiry.purge.Outcome`` as JSON; ``409 BUSY`` when content is being read
  or fetched (nothing removed), ``404 NOT_FOUND`` when nothing matched;
- ``POST /quarantine`` with ``{"digests": [...]}``: each re-hashed here, the damaged
  ones moved to ``ROOT/_quarantine`` and forgotten (``Repair`` as JSON).

Errors use the distribution spec's JSON error body.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regmirror.api.responses import finish_json, json_body, render_error, render_failure
from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError
from regmirror.expiry.purge import Purger, Target
from regmirror.logs import get_logger

log = get_logger()

MAX_BODY = 1024 * 1024


class AdminError(RegistryError):
    status = 400
    code = "INVALID"


class Busy(RegistryError):
    status = 409
    code = "BUSY"


class NotFound(RegistryError):
    status = 404
    code = "NOT_FOUND"


class AdminAPI(Resource):
    isLeaf = True

    def __init__(self, purger: Purger, root: str) -> None:
        super().__init__()
        self._purger = purger
        self._root = root

    def render_GET(self, request: Request) -> bytes:
        if request.path != b"/":
            return render_error(request, NotFound("unknown admin endpoint"))
        body = json.dumps({"pid": os.getpid(), "root": self._root}).encode()
        return json_body(request, body)

    def render_POST(self, request: Request) -> bytes | int:
        handlers = {b"/purge": self._purge, b"/quarantine": self._quarantine}
        handler = handlers.get(request.path)
        if handler is None:
            return render_error(request, NotFound("unknown admin endpoint"))
        try:
            assert request.content is not None
            data = json.loads(request.content.read(MAX_BODY + 1)[:MAX_BODY])
        except ValueError:
            return render_error(request, AdminError("the body is not JSON"))
        d = Deferred.fromCoroutine(handler(request, data))
        d.addErrback(render_failure, request)
        return NOT_DONE_YET

    async def _purge(self, request: Request, data: Any) -> None:
        try:
            target = Target.from_json(data)
        except (ValueError, RegistryError) as e:
            raise AdminError(f"bad purge target: {e}") from None
        outcome = await self._purger.purge(target)
        if not outcome.plan.matched:
            raise NotFound(f"nothing in the cache matches {target}", outcome.as_json())
        if outcome.busy:
            raise Busy(
                f"{len(outcome.busy)} of the blobs and manifests of {target} are being read "
                "or fetched now: nothing was removed; try again",
                outcome.as_json(),
            )
        log.info(
            "purged {target}: {count} blobs and manifests, {freed} bytes",
            target=str(target),
            count=len(outcome.plan.content),
            freed=outcome.freed,
        )
        finish_json(request, json.dumps(outcome.as_json()).encode(), None)

    async def _quarantine(self, request: Request, data: Any) -> None:
        texts = data.get("digests") if isinstance(data, dict) else None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise AdminError('expected {"digests": [...]}')
        repair = await self._purger.quarantine([Digest.parse(t) for t in texts])
        result = repair.as_json()
        if result["quarantined"]:
            log.warn(
                "quarantined damaged content: {digests}", digests=", ".join(result["quarantined"])
            )
        finish_json(request, json.dumps(result).encode(), None)


def admin_resource(purger: Purger, root: str) -> Resource:
    return AdminAPI(purger, root)
