"""``regmirror ls``, ``purge`` and ``fsck``: the store of a configuration, read through
``regmirror.storage`` and the reaper's state (``regmirror.expiry``); what changes it goes
through the running mirror's admin socket, or, when no mirror runs, the same code
(``regmirror.expiry.purge``) on the store directly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python import lockfile
from twisted.python.failure import Failure

from regmirror.cli.http import admin_call, error_message
from regmirror.cli.output import Exit, Failed, when
from regmirror.cli.refs import route
from regmirror.config import Config
from regmirror.domain.digest import Digest
from regmirror.domain.errors import RegistryError
from regmirror.domain.kinds import Kind
from regmirror.expiry.ledger import Entry
from regmirror.expiry.purge import Purger, Target
from regmirror.expiry.state import StateDB
from regmirror.storage.check import Verdict, verify
from regmirror.storage.repositories import RepoKey, Repositories
from regmirror.storage.store import Store


def running_mirror(store: Store) -> str | None:
    """The admin socket of the mirror running on ``store``; None when none runs.
    ``Failed`` (exit 3) when one runs (its PID lock is held) but does not answer, or the
    socket may not be used by this user."""
    path = str(store.admin_socket)
    try:
        admin_call(path, "GET", "/", timeout=10)
    except (FileNotFoundError, ConnectionRefusedError):
        if lockfile.isLocked(path + ".lock"):
            raise Failed(
                Exit.UNREACHABLE,
                f"a mirror runs on {store.root} (it holds {path}.lock) but its admin socket "
                "does not answer; nothing changed",
            ) from None
        return None
    except PermissionError:
        raise Failed(
            Exit.UNREACHABLE, f"{path}: permission denied: run as root or as the mirror's user"
        ) from None
    except OSError as e:
        raise Failed(Exit.UNREACHABLE, f"{path}: {e}") from None
    return path


# -- ls -------------------------------------------------------------------------------


def listing(config: Config, repository: str | None) -> list[dict[str, Any]]:
    store = Store(config.root)
    repos = Repositories(store)
    entries = StateDB(store.reaper_state).peek()
    keys = repos.keys()
    if repository is not None:
        try:
            routed = route(config, repository)
        except ValueError as e:
            raise Failed(Exit.USAGE, str(e)) from None
        keys = [k for k in keys if k == RepoKey(routed.upstream.name, routed.repository)]
    out = []
    for key in keys:
        found = repos.read(key)
        if found is None:
            continue
        kinds = {d: repos.kind(d) for d in repos.closure(found.roots())}
        present = [d for d, kind in kinds.items() if kind is not None]
        used = [_last_use(entries, store, d) for d in present]
        out.append(
            {
                "upstream": key.upstream,
                "repository": key.name,
                "tags": {tag: list(variants.values())[-1] for tag, variants in found.tags.items()},
                "manifests": sum(1 for d in present if kinds[d] is Kind.MANIFEST),
                "blobs": sum(1 for d in present if kinds[d] is Kind.BLOB),
                "size": sum(store.blob_size(d) or 0 for d in present),
                "last_used": when(max((u for u in used if u is not None), default=None)),
            }
        )
    return out


def _last_use(entries: dict[Digest, Entry], store: Store, digest: Digest) -> float | None:
    entry = entries.get(digest)
    if entry is not None:
        return entry.last_used
    try:
        return store.blob_path(digest).stat().st_mtime
    except FileNotFoundError:
        return None


# -- purge and quarantine -----------------------------------------------------------


def refuse_shared(config: Config) -> None:
    """``purge`` and ``fsck --repair`` go through one mirror's admin socket (its ledger,
    what it reads now), or on the store directly when none runs: neither is safe when
    replicas (``regmirror.cluster``) or workers share the store, so they are refused
    (exit 2) before anything is read or changed."""
    if config.cluster is not None:
        key, who = "regmirror.cluster", "replicas"
    elif config.workers > 1:
        key, who = "regmirror.workers", "workers"
    else:
        return
    raise Failed(
        Exit.USAGE, f"purge/fsck --repair: not supported with {key} yet (the {who} share the store)"
    )


def parse_target(config: Config, text: str) -> Target:
    """``REPO[:TAG]``, ``REPO@DIGEST`` or ``DIGEST`` -> a ``Target``."""
    digest_text = text.rpartition("@")[2] if "@" in text else text
    if digest_text.startswith(("sha256:", "sha512:")):
        try:
            return Target(digest=Digest.parse(digest_text))
        except RegistryError:
            raise Failed(Exit.USAGE, f"{text}: not a sha256 or sha512 digest") from None
    name, tag = text, ""
    colon = text.rfind(":")
    if colon > text.rfind("/"):
        name, tag = text[:colon], text[colon + 1 :]
    try:
        routed = route(config, name)
    except ValueError as e:
        raise Failed(Exit.USAGE, str(e)) from None
    return Target(routed.upstream.name, routed.repository, tag)


def purge(config: Config, target: Target) -> dict[str, Any]:
    store = Store(config.root)
    socket = running_mirror(store)
    if socket is not None:
        status, answer = admin_call(socket, "POST", "/purge", target.as_json())
        if status == 200:
            return {"via": "mirror", **answer}
        raise Failed(
            Exit.PROBLEMS if status in (404, 409) else Exit.UNREACHABLE,
            error_message(answer),
            _detail(answer),
        )
    outcome = _direct(store, lambda purger: purger.purge(target))
    if not outcome.plan.matched:
        raise Failed(Exit.PROBLEMS, f"nothing in the cache matches {target}", outcome.as_json())
    return {"via": "store", **outcome.as_json()}


def quarantine(store: Store, digests: list[Digest]) -> dict[str, Any]:
    socket = running_mirror(store)
    if socket is not None:
        status, answer = admin_call(
            socket, "POST", "/quarantine", {"digests": list(map(str, digests))}
        )
        if status != 200:
            raise Failed(Exit.UNREACHABLE, error_message(answer), _detail(answer))
        return {"via": "mirror", **answer}
    repair = _direct(store, lambda purger: purger.quarantine(digests))
    return {"via": "store", **repair.as_json()}


def _detail(answer: Any) -> Any:
    try:
        return answer["errors"][0].get("detail")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def _direct(store: Store, work: Callable[[Purger], Any]) -> Any:
    """Run ``work`` on a ``Purger`` of the store itself (no mirror runs: nothing is in
    use, nothing is in memory), then remove what it dropped from the reaper's state."""
    dropped: list[Digest] = []
    purger = Purger(
        store,
        run_in_thread=lambda f, *a: succeed(f(*a)),
        in_use=lambda digest: False,
        drop=dropped.append,
        on_removed=lambda kind, digest: None,
        on_tag_removed=lambda upstream, repository, tag: None,
    )
    results: list[Any] = []
    Deferred.fromCoroutine(work(purger)).addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    if dropped and store.reaper_state.exists():
        StateDB(store.reaper_state).save(dict.fromkeys(dropped))
    return results[0]


# -- fsck -----------------------------------------------------------------------------


@attrs.frozen
class Damage:
    digest: Digest
    kind: str
    size: int
    verdict: Verdict


def fsck(
    store: Store, advance: Callable[[int], object], total: Callable[[int], object]
) -> tuple[int, list[Damage]]:
    """Re-hash every blob and manifest; (entries checked, the damaged or vanished)."""
    found = store.scan()
    total(sum(s.size for s in found))
    bad = []
    for stored in found:
        verdict = verify(store, stored.digest, advance)
        if verdict is Verdict.DAMAGED:  # (a file gone since the scan was expired)
            bad.append(Damage(stored.digest, str(stored.kind), stored.size, verdict))
    return len(found), bad
