"""The admin listener: ``regmirror.api.admin`` on a unix socket beside the reaper's
state (``ROOT/_state/admin.sock``, mode 0600, with a PID lock file), never on the public
listener."""

from __future__ import annotations

import os
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.web.server import Site

from regmirror.api.admin import admin_resource
from regmirror.expiry.purge import Purger
from regmirror.logs import get_logger
from regmirror.storage.store import Store

log = get_logger()

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes, the last one NUL


def add_admin_listener(
    top: service.MultiService, store: Store, purger: Purger, reactor: Any
) -> bool:
    """Serve the admin API on ``store.admin_socket``; False (and a warning) when that
    path is too long for a unix socket."""
    path = str(store.admin_socket)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        log.warn(
            "the admin socket {path} is too long a path for a unix socket: no admin API "
            "(regmirror purge and fsck --repair need the mirror stopped)",
            path=path,
        )
        return False
    site = Site(admin_resource(purger, str(store.root)))
    site.noisy = False
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=1)
    StreamServerEndpointService(endpoint, site).setServiceParent(top)
    return True
