"""Instructions per cached manifest GET, counted by callgrind: a measure of the hot
path that the machine's load does not move (wall-clock rates here vary by ±30 %).

    .venv/bin/python -m bench.instructions [--requests 2000] [--tree DIR] [--full-path]

Starts a docker-registry with one image and regmirror (twistd) under
``valgrind --tool=callgrind``, primes the manifest, sends ``--requests`` keep-alive GETs
by digest with ``ab``, stops the mirror and reads callgrind's total; the same with no
requests, and prints the difference per request. ``--tree`` measures another checkout
(e.g. a worktree of an older commit) with this one's harness; ``--full-path`` turns the
channel's fast path for cached manifests off (``regmirror.fast_path: false``).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.images import ACCEPT_MANIFESTS, oci_image, push_image
from tests.support.mirror import REPO_ROOT, Mirror
from tests.support.process import require_tool
from tests.support.rawhttp import request
from tests.support.upstream import UpstreamRegistry


def _count(tree: Path, requests: int, base: Path, settings: dict[str, object]) -> int:
    out = base / f"callgrind.{requests}"
    wrapper = base / f"python-{requests}.sh"
    wrapper.write_text(
        "#!/bin/sh\nexec valgrind --tool=callgrind "
        f'--callgrind-out-file={out} {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    registry = UpstreamRegistry(base / f"upstream-{requests}")
    registry.start()
    try:
        image = push_image(registry.url, oci_image("bench/m", "1.0", seed="instructions"))
        mirror = Mirror(
            base / f"mirror-{requests}",
            registry.url,
            log_level="warn",
            extra={"regmirror": {"access_log": False, **settings}},
            repo_root=tree,
            env={"PYTHONPATH": str(tree)},
            python=str(wrapper),
            ready_timeout=600,
        )
        mirror.start()
        try:
            path = f"/v2/bench/m/manifests/{image.digest}"
            for _ in range(3):
                got = request(mirror.url, "GET", path, headers={"Accept": ACCEPT_MANIFESTS})
                assert got.status == 200, got.status
            if requests:
                done = subprocess.run(
                    [require_tool("ab"), "-q", "-n", str(requests), "-c", "4", "-k",
                     "-H", f"Accept: {ACCEPT_MANIFESTS}", mirror.url + path],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                if "Failed requests:        0" not in done.stdout:
                    raise SystemExit(f"ab saw failed requests:\n{done.stdout}")
        finally:
            mirror.stop(timeout=120)
    finally:
        registry.stop()
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(errors="replace"), re.M)
    if found is None:
        raise SystemExit(f"no total in {out}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tree", type=Path, default=REPO_ROOT)
    parser.add_argument("--full-path", action="store_true", help="regmirror.fast_path: false")
    args = parser.parse_args()
    settings: dict[str, object] = {"fast_path": False} if args.full_path else {}
    require_tool("valgrind")
    with tempfile.TemporaryDirectory(prefix="regmirror-instructions-") as tmp:
        base = Path(tmp)
        idle = _count(args.tree.resolve(), 0, base, settings)
        busy = _count(args.tree.resolve(), args.requests, base, settings)
    per = (busy - idle) / args.requests
    path = " (full path)" if args.full_path else ""
    print(f"{args.tree}{path}: {per:,.0f} instructions per cached manifest GET "
          f"({args.requests} requests; start-up {idle:,} subtracted)")  # fmt: skip


if __name__ == "__main__":
    main()
