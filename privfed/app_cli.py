"""``privfed-app``: publish, review and approve the app bundle a deployment runs.

    privfed-app build -o privfed.fab                 # operator: the bundle and its digest
    privfed-app digest privfed.fab                   # anyone: the digest of a bundle
    privfed-app review privfed.fab                   # device owner: what differs from mine
    privfed-app approve --data-dir D --fab privfed.fab [--note "release 0.2, reviewed"]
    privfed-app approve --data-dir D --digest 3f2a...   # a digest published with a release
    privfed-app approve --data-dir D --installed     # the bundle of the privfed installed here
    privfed-app approved --data-dir D                # what this device approved

A device started with ``privfed-edge`` runs only bundles whose digest is in
``DATA_DIR/approved-apps.txt`` (privfed/app_bundle.py, privfed/edge_gate.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from privfed import app_bundle
from privfed.app_bundle import Approvals, BundleError


def _approvals(data_dir: Path) -> Approvals:
    return Approvals(data_dir / app_bundle.APPROVALS_FILE)


def _read_fab(path: Path) -> bytes:
    if not path.is_file():
        raise SystemExit(f"privfed-app: no such file: {path}")
    return path.read_bytes()


def cmd_build(args: argparse.Namespace) -> int:
    fab = app_bundle.build_fab()
    args.output.write_bytes(fab)
    print(f"{app_bundle.app_digest(fab)}  {args.output} ({len(fab):,} bytes)")
    return 0


def cmd_digest(args: argparse.Namespace) -> int:
    print(app_bundle.app_digest(_read_fab(args.fab)))
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    fab = _read_fab(args.fab)
    mine = app_bundle.build_fab()
    print(f"bundle     {app_bundle.app_digest(fab)}  {args.fab}")
    print(f"installed  {app_bundle.app_digest(mine)}  privfed at {app_bundle.package_dir()}")
    changes = list(app_bundle.differences(fab, mine))
    for status, name in changes:
        print(f"  {status:8} {name}")
    if not changes:
        print("  the bundle is the privfed installed here, file for file")
    else:
        print(f"{len(changes)} file(s) differ: read them (unzip -p BUNDLE FILE) before approving")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    if args.installed:
        digest, what = app_bundle.installed_digest(), "the privfed installed here"
    elif args.fab is not None:
        digest, what = app_bundle.app_digest(_read_fab(args.fab)), str(args.fab)
    else:
        digest, what = app_bundle.parse_digest(args.digest), "a published digest"
    approvals = _approvals(args.data_dir)
    added = approvals.add(digest, args.note or what)
    print(f"{'approved' if added else 'already approved'}: {digest} ({what}) in {approvals.path}")
    return 0


def cmd_approved(args: argparse.Namespace) -> int:
    approvals = _approvals(args.data_dir)
    found = approvals.digests()
    for digest, note in found.items():
        print(f"{digest}  {note}")
    if not found:
        print(f"no app approved in {approvals.path}", file=sys.stderr)
        return 1
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privfed-app", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the app bundle of the privfed installed here")
    b.add_argument("-o", "--output", type=Path, default=Path("privfed.fab"))
    b.set_defaults(run=cmd_build)
    d = sub.add_parser("digest", help="the digest of a bundle")
    d.add_argument("fab", type=Path)
    d.set_defaults(run=cmd_digest)
    r = sub.add_parser("review", help="what a bundle changes against the privfed installed here")
    r.add_argument("fab", type=Path)
    r.set_defaults(run=cmd_review)
    a = sub.add_parser("approve", help="let this device run a bundle")
    a.add_argument("--data-dir", type=Path, required=True, help="the device's own directory")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--fab", type=Path, help="a bundle file you reviewed")
    what.add_argument("--digest", help="a digest published with a release you reviewed")
    what.add_argument("--installed", action="store_true", help="the privfed installed here")
    a.add_argument("--note", help="why (kept beside the digest)")
    a.set_defaults(run=cmd_approve)
    ls = sub.add_parser("approved", help="the bundles this device approved")
    ls.add_argument("--data-dir", type=Path, required=True)
    ls.set_defaults(run=cmd_approved)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = args.run(args)
    except (BundleError, ValueError) as err:
        print(f"privfed-app: {err}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


if __name__ == "__main__":
    main()
