"""Test-only hook, imported by a replica's twistd before it starts (``FaultMirror``'s
preamble) when ``REGMIRROR_FAULTS_UNFENCED=1``: the reaper's claim script without its
fencing check, to show that ``test_pauses.py``'s paused-leader test fails without it.
Nothing in regmirror reads this; it replaces the script in the process it runs in."""

from __future__ import annotations

from regmirror.expiry import clusterreaper, clusterscripts

GUARD = (
    "if redis.call('GET', p .. ':reaper') ~= ARGV[2] then\n"
    "  return redis.error_reply('FENCED another reaper leads now')\n"
    "end\n"
)

assert GUARD in clusterscripts.CLAIM, "the claim script changed: update this hook"
clusterreaper.CLAIM = clusterscripts.CLAIM.replace(GUARD, "")
