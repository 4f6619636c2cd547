"""``python -m bench``: options, tool check, the run, the report."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from bench.env import BenchEnv, MiB, tree_rss_kib
from bench.profile import py_spy_path
from bench.report import render_markdown, render_text
from bench.scale import SCALE_SCENARIOS
from bench.scenarios import MB, Context, Params, rss_rows
from bench.scenarios import SCENARIOS as BASE_SCENARIOS

SCENARIOS = dict(sorted({**BASE_SCENARIOS, **SCALE_SCENARIOS}.items(), key=lambda kv: int(kv[0])))
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"

# program -> Debian package that provides it
TOOLS = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "wrk": "wrk",
    "ab": "apache2-utils",
    "curl": "curl",
    "sha256sum": "coreutils",
    "redis-server": "redis-server",
    "nginx": "nginx",
}
# Where Debian installs a program that a user's PATH may lack.
SBIN = {"nginx": "/usr/sbin/nginx"}


def missing_tools() -> dict[str, str]:
    return {
        tool: pkg
        for tool, pkg in TOOLS.items()
        if shutil.which(tool) is None and not (tool in SBIN and os.access(SBIN[tool], os.X_OK))
    }


def parse_config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``regmirror.workers=2`` -> ``{"regmirror": {"workers": 2}}`` (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise argparse.ArgumentTypeError(f"{key}: {part} is both a value and a section")
        node[parts[-1]] = value
    return out


def parse_only(text: str) -> list[str]:
    names = {name: key for key, (name, _) in SCENARIOS.items()}
    keys = []
    for part in text.split(","):
        part = part.strip().lower()
        key = part if part in SCENARIOS else names.get(part)
        if key is None:
            choices = ", ".join(f"{k} ({n})" for k, (n, _) in SCENARIOS.items())
            raise argparse.ArgumentTypeError(f"unknown scenario {part!r}; choose from {choices}")
        if key not in keys:
            keys.append(key)
    return sorted(keys)


def build_parser() -> argparse.ArgumentParser:
    scenarios = "; ".join(f"{k} {n}" for k, (n, _) in SCENARIOS.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark regmirror beside the distribution registry in proxy mode "
        "and nginx proxy_cache, all in front of the same upstream on loopback, in one run. "
        "See bench/README.md.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 2 minutes): 16 MiB layers, 32 MiB blobs, 3 s load runs; "
        "writes no report unless --out is given",
    )
    parser.add_argument(
        "--only",
        type=parse_only,
        metavar="SCENARIO[,..]",
        help=f"run only these scenarios, by number or name ({scenarios}); "
        "writes no report unless --out is given",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help=f"Markdown report (default for a full run: {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--regmirror-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a key of regmirror's config.yml (dotted, value as YAML), "
        "e.g. regmirror.fsync=false; repeatable",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="length of each wrk / ab run (default 10, 3 with --quick)",
    )
    parser.add_argument(
        "--wan-rate",
        type=float,
        default=128.0,
        metavar="MIB_PER_S",
        help="upstream cap for the capped run of scenario 5 (default 128 MiB/s)",
    )
    parser.add_argument(
        "--tmp-dir", type=Path, help="where the servers' stores go (default: $TMPDIR)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the stores and logs (the path is printed)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="write py-spy flame graphs of regmirror during its measured runs to DIR "
        "(profiled numbers are slower: not the ones to report)",
    )
    return parser


# --- environment description ---------------------------------------------------------


def tool_version(argv: Sequence[str], pattern: str) -> str:
    """The version a program prints (``pattern``'s first group), or its first line."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    text = (proc.stdout + proc.stderr).strip()
    match = re.search(pattern, text)
    if match:
        return match.group(1)
    return text.splitlines()[0].strip() if text else "?"


def machine_info() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "CPUs (nproc)": str(len(os.sched_getaffinity(0))),
        "CPU model": model,
        "memory": mem,
        "kernel": platform.release(),
    }


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "regmirror", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + (" + uncommitted changes" if dirty else "")


def versions() -> dict[str, str]:
    def pkg(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "regmirror": f"{pkg('regmirror')} (git {_git_commit()})",
        "python": platform.python_version(),
        "twisted": pkg("twisted"),
        "treq": pkg("treq"),
        "docker-registry": tool_version(["docker-registry", "--version"], r"distribution (\S+)"),
        "skopeo": tool_version(["skopeo", "--version"], r"version (\S+)"),
        "curl": tool_version(["curl", "--version"], r"^curl (\S+)"),
        "wrk": tool_version(["wrk", "-v"], r"^wrk (\S+)"),
        "ab": tool_version(["ab", "-V"], r"Version (\S+)"),
        "nginx": tool_version(
            [SBIN["nginx"] if os.access(SBIN["nginx"], os.X_OK) else "nginx", "-v"], r"nginx/(\S+)"
        ),
    }


def command_line(argv: Sequence[str]) -> str:
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(REPO_ROOT))
    except ValueError:
        shown = "python"
    return " ".join([shown, "-m", "bench", *(shlex.quote(a) for a in argv)]).rstrip()


# --- the run ---------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    wan_rate = args.wan_rate * MiB
    if args.quick:
        params = Params.quick_run(args.duration or 3.0, wan_rate)
    else:
        params = Params.full(args.duration or 10.0, wan_rate)
    overrides = parse_config_overrides(args.regmirror_config)
    selected = args.only or list(SCENARIOS)
    out: Path | None = args.out
    if out is None and not args.quick and not args.only:
        out = DEFAULT_OUT
    started_at = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()

    if args.tmp_dir is not None:
        args.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="regmirror-bench-", dir=args.tmp_dir))
    env = BenchEnv(tmp / "servers", regmirror_extra=overrides)
    ctx = Context(env, params, tmp, profile_dir=args.profile)
    problems: list[str] = []
    dist_problems: list[str] = []
    nginx_problems: list[str] = []
    interrupted: int | None = None
    try:
        ctx.log(f"starting upstream, distribution proxy, nginx and regmirror under {tmp}")
        env.start()
        time.sleep(0.5)
        for side in env.sides:
            assert side.pid is not None
            total, largest = tree_rss_kib(side.pid)
            ctx.rss.setdefault("idle", {})[side.key] = total * 1024 / MB
            ctx.rss_process.setdefault("idle", {})[side.key] = largest * 1024 / MB
        for key in selected:
            name, fn = SCENARIOS[key]
            ctx.log(f"scenario {key} ({name})")
            try:
                fn(ctx)
            except Exception as e:
                ctx.failures.append(f"scenario {key} ({name}) crashed: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stderr)
        rss_rows(ctx)
    except (KeyboardInterrupt, SystemExit) as e:
        # Ctrl-C or SIGTERM: stop everything, print what was measured, write no report.
        interrupted = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130
        ctx.failures.append("interrupted: the table is partial")
        out = None
    finally:
        try:
            if env.rm is not None:
                problems = env.regmirror_problems()
            if env.dist is not None:
                dist_problems = env.distribution_problems()
            if env.nginx is not None:
                nginx_problems = env.nginx_problems()
        except Exception as e:
            problems.append(f"(could not read the logs: {e!r})")
        if env.rm is not None and env.rm.server.running is False and env.rm.pid is not None:
            ctx.failures.append(f"regmirror exited during the run (status {env.mirror.returncode})")
        ctx.log("stopping the servers")
        env.stop()
        if args.keep:
            ctx.log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - t0

    table = render_text(ctx.rows)
    print(table)
    print()
    print(
        "rm/dist, rm/nginx = regmirror ÷ the peer (rates: higher is better; times, bytes: lower)."
    )
    for note in ctx.notes:
        print(note)
    print(f"{len(selected)} scenario(s) in {elapsed:.0f} s.")
    if ctx.failures:
        print("\nFailures:")
        for f in ctx.failures:
            print(f"  - {f}")
    if problems:
        print(f"\nregmirror log: {len(problems)} warning/error line(s); the first ones:")
        for p in problems[:15]:
            print("  " + p.replace("\n", "\n  "))
    if dist_problems:
        print(f"\ndistribution log: {len(dist_problems)} error line(s); the first ones:")
        for p in dist_problems[:5]:
            print("  " + p)
    if nginx_problems:
        print(f"\nnginx error log: {len(nginx_problems)} line(s); the first ones:")
        for p in nginx_problems[:5]:
            print("  " + p)
    if out is not None:
        report = markdown_report(
            ctx, params, overrides, selected, command_line(argv), started_at, elapsed, problems
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"\nwrote {out}")
    if interrupted is not None:
        return interrupted
    return 1 if ctx.failures else 0


def markdown_report(
    ctx: Context,
    params: Params,
    overrides: dict[str, Any],
    selected: Sequence[str],
    command: str,
    started_at: datetime.datetime,
    elapsed: float,
    problems: Sequence[str],
) -> str:
    lines = [
        "# Benchmarks",
        "",
        "regmirror beside the distribution registry (`docker-registry`, proxy mode) and",
        "nginx `proxy_cache`, each with an empty cache in front of the same upstream registry",
        "on loopback, each through a door of its own (a read-only registry on the upstream's",
        "storage, counted from its log: no proxy in the path), measured in the same run.",
        "How and why:",
        "[bench/README.md](../bench/README.md). This file is written by the benchmark;",
        "rerun it rather than editing it.",
        "",
        f"- date: {started_at.strftime('%Y-%m-%d %H:%M UTC')} ({elapsed:.0f} s)",
        f"- command: `{command}` (or `make bench BENCH_ARGS='...'`)",
    ]
    for key, value in machine_info().items():
        lines.append(f"- {key}: {value}")
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    if overrides:
        lines.append(f"- regmirror config overrides: `{yaml.safe_dump(overrides).strip()}`")
    lines.append(
        f"- nginx: worker_processes {ctx.env.nginx_workers} (scenario 4 also 1), the config of "
        "`tests/support/nginx.py` (proxy_cache, proxy_cache_lock, sendfile)"
    )
    lines += [
        f"- scenarios: {', '.join(f'{k} {SCENARIOS[k][0]}' for k in selected)}",
        f"- sizes: image {params.layers} x {params.layer_size / MiB:g} MiB raw layers, "
        f"{params.pull_repeats} cold pull(s) per side; blob {params.blob_size / MiB:g} MiB, "
        f"{params.cold_blob_runs} cold / {params.cached_blob_runs} cached GETs; load runs "
        f"{params.load_duration:g} s; {params.clients} clients on a "
        f"{params.concurrent_blob_size / MiB:g} MiB cold blob (cap "
        f"{params.wan_rate / MiB:g} MiB/s) and a {params.rss_blob_size / MiB:g} MiB cached blob",
        "",
        "rm/dist and rm/nginx = regmirror ÷ the peer: for rates higher is better, for",
        "times, bytes and memory lower is better.",
        "",
        render_markdown(ctx.rows),
        "",
    ]
    if ctx.notes:
        lines += [*ctx.notes, ""]
    if ctx.failures:
        lines += ["## Failures", ""]
        lines += [f"- {f}" for f in ctx.failures]
        lines.append("")
    if problems:
        lines += [f"## regmirror log: {len(problems)} warning/error line(s)", "", "```"]
        lines += list(problems[:20])
        lines += ["```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_config_overrides(args.regmirror_config)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if args.profile is not None and py_spy_path() is None:
        parser.error("--profile needs py-spy (pip install py-spy into the venv)")
    missing = missing_tools()
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        print(
            f"bench: missing program(s): {', '.join(missing)}.\n"
            f"On Debian/Ubuntu install them with:  apt-get install {packages}\n"
            f"(the benchmark needs: {' '.join(sorted(set(TOOLS.values())))})",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    return run(args, argv)
