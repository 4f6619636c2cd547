"""Imports go one way (DESIGN.md): each module of regmirror imports only from its own
layer and the layers below it.

    cli > app > http > api > mirror > {expiry, fetch, upstream, storage} > domain

``regmirror.coord`` (the cluster's Redis) sits beside storage: fetch, expiry, mirror and
the layers above may use it; it uses only domain (with config, logs, reactor).

``regmirror.config``, ``regmirror.logs`` and ``regmirror.reactor`` (typing only) are
usable by every layer; config and domain import nothing above them (config uses domain,
so domain may not use config; logs imports nothing of ours). Among the four
under mirror: fetch and expiry may import storage; upstream and storage only domain
(with config, logs, reactor). ``regmirror.testing`` is for tests: no module imports it.
Imports under ``if TYPE_CHECKING:`` count too: a layer must not know what is above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import regmirror

ROOT = Path(regmirror.__file__).parent
SHARED = {"config", "logs", "reactor"}  # usable by every layer

# What each part of the package may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "domain": {"logs"},
    "config": {"domain", "logs"},
    "logs": set(),
    "reactor": set(),
    "storage": {"domain"} | SHARED,
    "coord": {"domain"} | SHARED,
    "upstream": {"domain"} | SHARED,
    "fetch": {"domain", "storage", "coord"} | SHARED,
    "expiry": {"domain", "storage", "coord"} | SHARED,
    "mirror": {"domain", "storage", "coord", "upstream", "fetch", "expiry"} | SHARED,
    "api": {"domain", "storage", "coord", "upstream", "fetch", "expiry", "mirror"} | SHARED,
    "http": {"domain", "storage", "coord", "upstream", "fetch", "expiry", "mirror", "api"} | SHARED,
    "app": {"domain", "storage", "coord", "upstream", "fetch", "expiry", "mirror", "api", "http"}
    | SHARED,
}
ALLOWED["cli"] = ALLOWED["app"] | {"app"}  # the command line, the top like app (anything)
EXEMPT = {"testing", "__init__"}  # regmirror.testing may use anything; the package root


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """``regmirror.api.resource`` -> ``api``; ``regmirror.config.limits`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for every regmirror module ``path`` imports."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "regmirror":  # from regmirror import logs
                found += [(node.lineno, f"regmirror.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.startswith("regmirror.")]


def upward_imports(root: Path = ROOT) -> list[str]:
    """One line per import of a layer above the importing module's."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        part = part_of(module)
        if part in EXEMPT:
            continue
        allowed = ALLOWED.get(part)
        for line, target in imported(path, root):
            other = part_of(target)
            if other == part:
                continue
            where = f"{path.relative_to(root.parent)}:{line}"
            if other == "testing":
                problems.append(
                    f"{where}: {module} imports {target} (regmirror.testing is for tests)"
                )
            elif allowed is None:
                problems.append(f"{where}: {module} is in no layer of DESIGN.md")
            elif other not in allowed:
                problems.append(
                    f"{where}: {module} ({part}) imports {target} ({other}), a layer above it"
                )
    return problems


def test_every_module_imports_only_from_its_layer_and_those_below() -> None:
    problems = upward_imports()
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_check_names_the_module_and_its_upward_import(tmp_path: Path) -> None:
    package = tmp_path / "regmirror"
    (package / "domain").mkdir(parents=True)
    (package / "domain" / "probe.py").write_text(
        "from ..api import resource\nimport regmirror.mirror.cache\nfrom regmirror import config\n"
    )
    (package / "fetch").mkdir()
    (package / "fetch" / "probe.py").write_text(
        "from regmirror.storage.store import Store\nfrom regmirror.expiry import usage\n"
        "from regmirror.testing import FakeRegistry\n"
    )
    assert upward_imports(package) == [
        "regmirror/domain/probe.py:1: regmirror.domain.probe (domain) imports "
        "regmirror.api (api), a layer above it",
        "regmirror/domain/probe.py:2: regmirror.domain.probe (domain) imports "
        "regmirror.mirror.cache (mirror), a layer above it",
        "regmirror/domain/probe.py:3: regmirror.domain.probe (domain) imports "
        "regmirror.config (config), a layer above it",
        "regmirror/fetch/probe.py:2: regmirror.fetch.probe (fetch) imports "
        "regmirror.expiry (expiry), a layer above it",
        "regmirror/fetch/probe.py:3: regmirror.fetch.probe imports regmirror.testing "
        "(regmirror.testing is for tests)",
    ]
