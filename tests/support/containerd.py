"""A private containerd daemon (CRI disabled) and its ``ctr`` client, for pulls through
the mirror configured the way operators configure containerd: a ``hosts.toml`` per
registry (containerd then sends ``?ns=<registry>`` to the mirror).

Everything lives under a short directory in /tmp (unix socket paths must stay under
108 bytes) that ``stop()`` removes; the daemon is stopped by PID.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.process import ManagedProcess, require_tool, tail
from tests.support.wait import poll_until


class Containerd:
    def __init__(self) -> None:
        self.containerd = require_tool("containerd")
        self.ctr = require_tool("ctr")
        self.base = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp"))
        self.socket = self.base / "c.sock"
        self.hosts_dir = self.base / "hosts"
        config = self.base / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.base}/root"\n'
            f'state = "{self.base}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.base}/t.sock"\n'
            '[debug]\n  address = ""\n'
        )
        self._process = ManagedProcess(
            [self.containerd, "--config", str(config)],
            stdout_path=self.base / "containerd.out",
            stderr_path=self.base / "containerd.log",
            name="containerd",
        )

    def start(self) -> None:
        self._process.start()
        poll_until(
            lambda: self._ctr("version", check=False).returncode == 0,
            20,
            what="containerd to answer on its socket",
            describe=lambda: tail(self.base / "containerd.log"),
        )

    def stop(self) -> None:
        self._process.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def mirror(self, registry: str, mirror_url: str) -> None:
        """``hosts.toml`` for ``registry``: pull and resolve through the mirror only (the
        registry's own server is a closed port, so a pull that works went through it)."""
        directory = self.hosts_dir / registry
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts.toml").write_text(
            'server = "http://127.0.0.1:9"\n\n'
            f'[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n'
        )

    def pull(self, ref: str) -> subprocess.CompletedProcess[str]:
        return self._ctr(
            "images", "pull", "--hosts-dir", str(self.hosts_dir), "--snapshotter", "native", ref
        )

    def image_digest(self, ref: str) -> str:
        listing = self._ctr("images", "ls").stdout
        for line in listing.splitlines():
            fields = line.split()
            if fields and fields[0] == ref:
                return next(f for f in fields if f.startswith("sha256:"))
        raise AssertionError(f"{ref} not in ctr images ls:\n{listing}")

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.ctr, "--address", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done
