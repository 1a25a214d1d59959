"""The Flower app bundle (FAB) a deployment runs, named by its content, approved by each device.

In a deployment the server submits the app (``flwr run``) and every SuperNode installs and runs
the bundle it is sent. A device that ran whatever it is sent would run the server's code: its
budget check, its secret noise and its public-fields check would all be the server's to switch
off. So a device runs a bundle only if its owner approved that exact content
(:mod:`privfed.edge_gate`), by digest.

* **What is in the bundle**: privfed's own package as installed here (``privfed/**/*.py`` and its
  Hydra config), and a ``pyproject.toml`` made from this module's template. Nothing of a
  checkout (README, tests, benchmark results), so the digest changes only when the code does.
* **The digest** (``app_digest``) is SHA-256 over every member's name and SHA-256, in name order
  (the ``.info/CONTENT`` manifest, which Flower derives from the rest, left out). It does not
  depend on zip compression or timestamps: anyone who builds the same privfed with the same
  Flower gets the same digest, so a device owner can check a release against the source.
* **The approvals** are a text file on the device (``approved-apps.txt``): one digest per line,
  with a note. ``privfed-app approve`` adds to it; nothing else writes it.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import privfed

MANIFEST = ".info/CONTENT"  # Flower's, derived from the other members: not part of the digest
APPROVALS_FILE = "approved-apps.txt"
APPROVALS_ENV = "PRIVFED_APPROVED_APPS"  # set by privfed-edge for its SuperNode's processes
_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")

PYPROJECT = """\
# The Flower app privfed submits (privfed/app_bundle.py): the package alone, no dependencies
# (a device runs the bundle in the environment its owner installed).
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "privfed"
version = "{version}"
description = "privfed's ServerApp and ClientApp"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "privfed"

[tool.flwr.app.components]
serverapp = "privfed.server.app:app"
clientapp = "privfed.client.app:app"

[tool.flwr.app.config]
privfed-config = ""
privfed-run-dir = ""
"""


class BundleError(ValueError):
    """A bundle that cannot be read as one (not a zip, duplicate or unsafe member names)."""


def package_dir() -> Path:
    """The privfed package this process runs (the checkout, in an editable install)."""
    return Path(privfed.__file__).resolve().parent


def _version() -> str:
    try:
        return metadata.version("privfed")
    except metadata.PackageNotFoundError:  # a copy on PYTHONPATH, not installed
        return "0.0.0"


def app_files(root: Path | None = None) -> dict[str, bytes | Path]:
    """The bundle's files, by their path in the bundle: the package's sources and config."""
    root = root or package_dir()
    files: dict[str, bytes | Path] = {
        "pyproject.toml": PYPROJECT.format(version=_version()).encode(),
    }
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        if path.suffix == ".py" or (path.suffix == ".yaml" and "conf" in path.parts):
            files[f"privfed/{path.relative_to(root).as_posix()}"] = path
    return files


def write_app_dir(dest: Path, root: Path | None = None) -> Path:
    """The bundle's files as a directory, for ``flwr run DIR`` (which builds the bundle)."""
    for name, content in app_files(root).items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return dest


def build_fab(root: Path | None = None) -> bytes:
    """The bundle as ``flwr run`` builds it from :func:`write_app_dir`'s directory."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files(app_files(root))
    return fab


def members(fab: bytes) -> dict[str, bytes]:
    """Every member of a bundle, by name; raises :class:`BundleError` unless each name is a
    plain relative path that occurs once (what is hashed is then what Flower extracts)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as err:
        raise BundleError(f"not a Flower app bundle: {err}") from None
    out: dict[str, bytes] = {}
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if name in out or name.startswith("/") or "\\" in name or ".." in parts:
            raise BundleError(f"unsafe or repeated member name {name!r}")
        if info.is_dir():
            continue
        out[name] = archive.read(info)
    return out


def app_digest(fab: bytes) -> str:
    """SHA-256 over every member's name and SHA-256, in name order, the manifest left out."""
    h = hashlib.sha256(b"privfed/app-digest/v1\0")
    for name, data in sorted(members(fab).items()):
        if name != MANIFEST:
            h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


def installed_digest() -> str:
    """The digest of the bundle this installation of privfed builds."""
    return app_digest(build_fab())


def parse_digest(text: str) -> str:
    """A digest as written by a person (``sha256:`` prefix optional); ValueError otherwise."""
    match = _DIGEST.match(text.strip().lower())
    if match is None:
        raise ValueError(f"not an app digest (64 hex digits): {text!r}")
    return match.group(1)


@dataclass(frozen=True)
class Approvals:
    """The digests a device's owner approved, in the device's own file."""

    path: Path

    def digests(self) -> dict[str, str]:
        """digest -> note; an absent file approves nothing."""
        if not self.path.exists():
            return {}
        found: dict[str, str] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            digest, _, note = text.partition(" ")
            try:
                found[parse_digest(digest)] = note.strip()
            except ValueError as err:
                raise ValueError(f"{self.path}:{number}: {err}") from None
        return found

    def approves(self, digest: str) -> bool:
        return digest in self.digests()

    def add(self, digest: str, note: str) -> bool:
        """Approve ``digest``; False if it already was."""
        if self.approves(digest):
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(f"{digest}  {' '.join(note.split())}\n")
        return True


def describe(fab: bytes) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of each member, for a review."""
    return [
        (name, len(data), hashlib.sha256(data).hexdigest())
        for name, data in sorted(members(fab).items())
    ]


def differences(fab: bytes, reference: bytes) -> Iterable[tuple[str, str]]:
    """(status, name) for each member that differs from ``reference``'s: added, removed,
    changed."""
    mine, theirs = members(fab), members(reference)
    for name in sorted(set(mine) | set(theirs)):
        if name == MANIFEST:
            continue
        if name not in theirs:
            yield "added", name
        elif name not in mine:
            yield "removed", name
        elif mine[name] != theirs[name]:
            yield "changed", name
