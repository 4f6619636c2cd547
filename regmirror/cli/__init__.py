"""``regmirror``, the operator's command line (the top layer, like ``regmirror.app``: it
may import anything): ``check-config``, ``prefetch``, ``ls``, ``purge``, ``fsck``.

Every command takes ``--json`` (one JSON document on stdout) and exits with one of
``regmirror.cli.output.Exit``: 0 ok, 1 problems found or the work failed, 2 a usage or
configuration error, 3 the mirror could not be reached.
"""
