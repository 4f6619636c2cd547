"""A small tmpfs mounted by the test itself (as root), for a store that runs out of space.

``SmallFS(path, size)`` mounts a tmpfs of ``size`` bytes on ``path`` (created if
needed) and unmounts it on exit (lazily if something still holds it open, so that a
failing test never leaves a mount behind). ``fill(leave)`` writes a filler file of the
test's own (another tenant of the disk) until only ``leave`` bytes are free;
``unfill()`` removes it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Self

from tests.support.process import require_tool


class SmallFS:
    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.filler = self.path / "_filler"
        self.mounted = False

    def __enter__(self) -> Self:
        if os.geteuid() != 0:
            raise RuntimeError("mounting a tmpfs needs root (the CI runs as root)")
        mount = require_tool("mount")
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
            check=True,
        )
        self.mounted = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.mounted:
            return
        umount = require_tool("umount")
        if subprocess.run([umount, str(self.path)], check=False).returncode != 0:
            subprocess.run([umount, "-l", str(self.path)], check=True)
        self.mounted = False

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        """Write a filler file until ``leave`` bytes (or a little less) are free."""
        with open(self.filler, "ab") as f:
            while (room := self.free() - leave) > 0:
                try:
                    f.write(b"\0" * min(room, 1 << 20))
                    f.flush()
                except OSError:
                    break

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)
