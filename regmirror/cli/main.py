"""The ``regmirror`` console script: the commands and how they print."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from regmirror.cli import store as store_commands
from regmirror.cli.http import MirrorClient
from regmirror.cli.output import Exit, Failed, json_option, run, say, size, stderr, stdout
from regmirror.cli.prefetch import Prefetch, exit_code, parse_platforms, summary
from regmirror.cli.refs import parse_image
from regmirror.cli.showconfig import as_yaml, check, effective
from regmirror.storage.store import Store

EPILOG = (
    "Exit status: 0 ok; 1 problems found (fsck), nothing matched or in use (purge), an "
    "image failed (prefetch); 2 a usage or configuration error; 3 the mirror did not "
    "answer."
)
CONFIG = click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The mirror's config.yml.",
)


def _progress(disabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=stderr(),
        disable=disabled or not stderr().is_terminal,
    )


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """regmirror: check a configuration, warm, list, purge and verify a mirror's cache."""


@main.command("check-config", epilog=EPILOG)
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
def check_config(file: str, as_json: bool) -> None:
    """Validate FILE as start-up does; print the effective configuration, secrets
    masked."""

    def work() -> tuple[Exit, Any]:
        config, warnings = check(file)
        return Exit.OK, {"file": file, "warnings": warnings, "config": effective(config)}

    def text(result: Any) -> None:
        for warning in result["warnings"]:
            say(f"warning: {warning}", err=True)
        sys.stdout.write(as_yaml(result["config"]))
        say(f"{file}: ok", err=True)

    run(as_json, work, text)


@main.command(epilog=EPILOG)
@click.option("--mirror", "mirror_url", required=True, help="The mirror: http://HOST:PORT.")
@click.option("--platform", "platforms", help="Only these platforms of an index: linux/amd64,...")
@click.option("--insecure", is_flag=True, help="Do not verify the mirror's TLS certificate.")
@click.option("--ca", type=click.Path(dir_okay=False, exists=True), help="PEM CA bundle.")
@click.option(
    "--user",
    help="USER[:PASSWORD] for a mirror with auth (the password, if not given, is read "
    "from REGMIRROR_PASSWORD).",
)
@click.argument("images", nargs=-1, required=True)
@json_option
def prefetch(
    mirror_url: str,
    platforms: str | None,
    insecure: bool,
    ca: str | None,
    user: str | None,
    images: tuple[str, ...],
    as_json: bool,
) -> None:
    """Warm the cache of a running mirror with IMAGES, as a client pulling them would."""

    def work() -> tuple[Exit, Any]:
        try:
            refs = [parse_image(image) for image in images]
        except ValueError as e:
            raise Failed(Exit.USAGE, str(e)) from None
        name, _, password = (user or "").partition(":")
        client = MirrorClient(
            mirror_url,
            insecure=insecure,
            ca=ca,
            user=name if user else None,
            password=password or os.environ.get("REGMIRROR_PASSWORD", ""),
        )
        walker = Prefetch(client, parse_platforms(platforms))
        results = []
        with _progress(as_json) as progress:
            for ref in refs:
                task = progress.add_task(str(ref), total=None)

                def advance(done: int, total: int, task: Any = task) -> None:
                    progress.update(task, completed=done, total=total)

                results.append(walker.image(ref, advance))
        client.close()
        return exit_code(results), summary(results)

    def text(result: Any) -> None:
        table = Table("image", "digest", "blobs", "fetched", "cached", "status")
        for image in result["images"]:
            status = image["error"] or "ok"
            table.add_row(
                image["image"],
                image["digest"][:19],
                str(image["blobs"]),
                size(image["fetched_bytes"]),
                size(image["cached_bytes"]),
                status,
            )
        stdout().print(table)
        line = (
            f"{size(result['bytes'])} in all: {size(result['fetched_bytes'])} fetched from "
            f"upstream, {size(result['cached_bytes'])} already cached"
        )
        if result["unknown_bytes"]:
            line += f", {size(result['unknown_bytes'])} unknown (no X-Cache header)"
        say(line)

    run(as_json, work, text)


@main.command("ls", epilog=EPILOG)
@CONFIG
@click.argument("repository", required=False)
@json_option
def ls(config_path: str, repository: str | None, as_json: bool) -> None:
    """List the cached repositories (or REPOSITORY): tags, size, last use."""

    def work() -> tuple[Exit, Any]:
        config, _ = check(config_path)
        found = store_commands.listing(config, repository)
        if repository is not None and not found:
            raise Failed(Exit.PROBLEMS, f"{repository}: not in the cache")
        return Exit.OK, {"repositories": found}

    def text(result: Any) -> None:
        table = Table("repository", "tags", "manifests", "blobs", "size", "last use (UTC)")
        for repo in result["repositories"]:
            tags = "\n".join(f"{t} → {d[:19]}" for t, d in repo["tags"].items()) or "-"
            table.add_row(
                f"{repo['upstream']}/{repo['repository']}",
                tags,
                str(repo["manifests"]),
                str(repo["blobs"]),
                size(repo["size"]),
                repo["last_used"] or "-",
            )
        stdout().print(table)

    run(as_json, work, text)


@main.command(epilog=EPILOG)
@CONFIG
@click.argument("target")
@json_option
def purge(config_path: str, target: str, as_json: bool) -> None:
    """Remove TARGET from the cache: REPO:TAG (the tag), REPO (its tags, and what no
    other repository references) or DIGEST (that content everywhere)."""

    def work() -> tuple[Exit, Any]:
        config, _ = check(config_path)
        store_commands.refuse_shared(config)
        return Exit.OK, store_commands.purge(config, store_commands.parse_target(config, target))

    def text(result: Any) -> None:
        say(
            f"purged {result['target']} (through the {result['via']}): "
            f"{len(result['tags'])} tags, {len(result['content'])} blobs and manifests, "
            f"{size(result['freed'])} freed"
        )

    run(as_json, work, text)


@main.command(epilog=EPILOG)
@CONFIG
@click.option("--repair", is_flag=True, help="Quarantine what is damaged (it is refetched).")
@json_option
def fsck(config_path: str, repair: bool, as_json: bool) -> None:
    """Re-hash every blob and manifest of the store; report the damaged ones."""

    def work() -> tuple[Exit, Any]:
        config, _ = check(config_path)
        if repair:
            store_commands.refuse_shared(config)
        store = Store(config.root)
        with _progress(as_json) as progress:
            task = progress.add_task("fsck", total=None)
            checked, bad = store_commands.fsck(
                store,
                lambda n: progress.advance(task, n),
                lambda total: progress.update(task, total=total),
            )
        result: dict[str, Any] = {
            "checked": checked,
            "damaged": [{"digest": str(b.digest), "kind": b.kind, "size": b.size} for b in bad],
        }
        if repair and bad:
            result["repair"] = store_commands.quarantine(store, [b.digest for b in bad])
        return (Exit.PROBLEMS if bad else Exit.OK), result

    def text(result: Any) -> None:
        for bad in result["damaged"]:
            say(f"damaged {bad['kind']} {bad['digest']} ({size(bad['size'])})")
        repaired = result.get("repair")
        if repaired is not None:
            say(
                f"quarantined {len(repaired['quarantined'])} (through the {repaired['via']}); "
                "they are fetched again on their next request"
            )
        say(f"{result['checked']} checked, {len(result['damaged'])} damaged")

    run(as_json, work, text)
