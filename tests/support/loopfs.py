"""A file system of a test's own: an ext4 image on a loop device, mounted (``noatime``)
under the test's directory, that the test can freeze (``fsfreeze -f``: every write to it
blocks, reads go on, as when a shared store's server stalls) and thaw.

A process blocked on a frozen file system cannot be killed until it is thawed, so
``frozen()`` thaws in ``finally`` and ``unmount()`` thaws first too; fixtures call
``unmount()`` at teardown, also on failure: thaw, unmount, detach the loop device,
remove the image. Needs root and util-linux (``losetup``, ``fsfreeze``), e2fsprogs.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.process import require_tool


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool(argv[0]), *argv[1:]], check=check, capture_output=True, text=True, timeout=60
    )


class LoopFs:
    def __init__(self, base_dir: Path, size_mb: int = 256) -> None:
        self.image = base_dir / "store.img"
        self.mount = base_dir / "mnt"
        self.size_mb = size_mb
        self.device = ""
        self.is_frozen = False

    def create(self) -> LoopFs:
        with open(self.image, "wb") as f:
            f.truncate(self.size_mb * 1024 * 1024)
        _run("mkfs.ext4", "-q", "-F", str(self.image))
        self.device = _run("losetup", "--find", "--show", str(self.image)).stdout.strip()
        self.mount.mkdir(parents=True, exist_ok=True)
        _run("mount", "-o", "noatime", self.device, str(self.mount))
        return self

    def freeze(self) -> None:
        _run("fsfreeze", "--freeze", str(self.mount))
        self.is_frozen = True

    def thaw(self) -> None:
        if self.is_frozen:
            _run("fsfreeze", "--unfreeze", str(self.mount), check=False)
            self.is_frozen = False

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def unmount(self) -> None:
        self.thaw()
        if self.device:
            _run("umount", str(self.mount), check=False)
            _run("losetup", "--detach", self.device, check=False)
            self.device = ""
        self.image.unlink(missing_ok=True)
