"""The app bundle a deployment runs and the device's gate (privfed/app_bundle.py, edge_gate.py):
the digest names the content and nothing else, the approvals file is the device's, and the
gate refuses everything its owner did not approve, failing closed where Flower is not as it
expects. The gate against a real SuperLink and SuperNode: tests/integration/test_federation_tls.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import pytest

from privfed import app_bundle, app_cli, edge, edge_gate
from privfed.app_bundle import Approvals, BundleError, app_digest


@pytest.fixture(scope="module")
def fab() -> bytes:
    return app_bundle.build_fab()


def rezip(members: dict[str, bytes], compression=zipfile.ZIP_STORED, when=(2001, 2, 3, 4, 5, 6)):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=when)
            z.writestr(info, data)
    return buf.getvalue()


def test_the_bundle_is_privfed_and_flower_builds_the_same_from_its_directory(fab, tmp_path):
    from flwr.cli.build import build_fab_from_disk

    names = set(app_bundle.members(fab))
    assert {"pyproject.toml", "privfed/client/app.py", "privfed/client/device.py"} <= names
    assert "privfed/conf/config.yaml" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/")) or n == "README.md"]
    # `flwr run DIR` (deployment.submit) builds exactly what privfed-app build prints
    on_disk = build_fab_from_disk(app_bundle.write_app_dir(tmp_path / "app"))
    assert app_digest(on_disk) == app_digest(fab) == app_bundle.installed_digest()


def test_the_digest_names_the_content_not_the_zip(fab):
    members = app_bundle.members(fab)
    same = rezip(members, zipfile.ZIP_STORED)  # other compression, other timestamps
    assert same != fab and app_digest(same) == app_digest(fab)
    without_manifest = {n: d for n, d in members.items() if n != app_bundle.MANIFEST}
    assert app_digest(rezip(without_manifest)) == app_digest(fab)  # the manifest is derived
    one_byte = {**members, "privfed/client/device.py": members["privfed/client/device.py"] + b" "}
    assert app_digest(rezip(one_byte)) != app_digest(fab)
    renamed = {**members, "privfed/client/devices.py": members["privfed/client/device.py"]}
    del renamed["privfed/client/device.py"]
    assert app_digest(rezip(renamed)) != app_digest(fab)
    extra = {**members, "sitecustomize.py": b"print('hi')"}
    assert app_digest(rezip(extra)) != app_digest(fab)


@pytest.mark.parametrize("name", ["../evil.py", "/abs.py", "a\\b.py", "privfed/../../x.py"])
def test_a_bundle_with_unsafe_names_is_not_a_bundle(name):
    with pytest.raises(BundleError):
        app_digest(rezip({"pyproject.toml": b"", name: b"x"}))


def test_a_bundle_with_a_repeated_name_is_not_a_bundle():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, pytest.warns(UserWarning):
        z.writestr("privfed/a.py", b"one")
        z.writestr("privfed/a.py", b"two")  # extracted last, hashed first: refused
    with pytest.raises(BundleError):
        app_digest(buf.getvalue())
    with pytest.raises(BundleError):
        app_digest(b"not a zip")


def test_approvals_are_the_devices_own_file(tmp_path):
    approvals = Approvals(tmp_path / "approved-apps.txt")
    assert approvals.digests() == {} and not approvals.approves("a" * 64)
    assert approvals.add("a" * 64, "release 1\nreviewed")
    assert not approvals.add("a" * 64, "again")
    approvals.path.write_text(
        approvals.path.read_text() + "# a comment\n\nsha256:" + "B" * 64 + "\n"
    )
    assert approvals.digests() == {"a" * 64: "release 1 reviewed", "b" * 64: ""}
    approvals.path.write_text("not-a-digest\n")
    with pytest.raises(ValueError, match="approved-apps.txt:1"):
        approvals.digests()


def test_the_gate_refuses_what_is_not_approved(fab, tmp_path):
    approvals = Approvals(tmp_path / "approved-apps.txt")
    with pytest.raises(edge_gate.AppNotApproved, match="not approved on this device"):
        edge_gate.checked_bundle(fab, approvals)
    approvals.add(app_digest(fab), "mine")
    assert edge_gate.checked_bundle(fab, approvals) == app_digest(fab)
    tampered = app_bundle.members(fab)
    tampered["privfed/client/device.py"] += b"\nDeviceBudget.from_env = lambda: None\n"
    with pytest.raises(edge_gate.AppNotApproved):
        edge_gate.checked_bundle(rezip(tampered), approvals)
    with pytest.raises(edge_gate.AppNotApproved, match="refused the server's app"):
        edge_gate.checked_bundle(b"garbage", approvals)


def run_shim(bin_dir, command: str, *args: str, env: dict | None = None):
    return subprocess.run(
        [str(bin_dir / command), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_every_task_command_is_gated_and_only_clientapps_can_run(tmp_path):
    bin_dir = edge_gate.install_shims(tmp_path / "bin")
    commands = edge_gate.task_commands()
    assert "flwr-clientapp" in commands and "flwr-serverapp" in commands
    assert sorted(p.name for p in bin_dir.iterdir()) == commands
    for command in commands:
        if command == "flwr-clientapp":
            continue
        out = run_shim(bin_dir, command, "--token", "t")
        assert out.returncode == 1 and "this device runs ClientApps only" in out.stdout
    # no approved app: the ClientApp shim refuses before it connects anywhere
    empty = {"PRIVFED_APPROVED_APPS": str(tmp_path / "none.txt")}
    out = run_shim(bin_dir, "flwr-clientapp", "--insecure", "--token", "t", env=empty)
    assert out.returncode == 1 and "no app is approved" in out.stdout
    approvals = Approvals(tmp_path / "approved.txt")
    approvals.add("c" * 64, "x")
    allow = ["--insecure", "--token", "t", "--allow-runtime-dependency-installation"]
    out = run_shim(
        bin_dir, "flwr-clientapp", *allow, env={"PRIVFED_APPROVED_APPS": str(approvals.path)}
    )
    assert out.returncode == 1 and "runtime dependency installation" in out.stdout


def test_the_gate_fails_closed_when_flowers_runner_changes(monkeypatch, tmp_path):
    from flwr.supernode.runtime import run_clientapp as runner

    def other_runner(*args, **kwargs):  # a runner that installs the bundle some other way
        return None

    monkeypatch.setattr(runner, "run_clientapp", other_runner)
    with pytest.raises(SystemExit, match="refusing to run any app"):
        edge_gate._guard_clientapp(Approvals(tmp_path / "a.txt"))


def test_the_gate_checks_the_bundle_before_flower_installs_it(monkeypatch, fab, tmp_path):
    from flwr.supernode.runtime import run_clientapp as runner

    installed = []

    def fake_install(content, *args, **kwargs):  # Flower's installer, faked: what reached it
        installed.append(content)

    monkeypatch.setattr(runner, "install_from_fab", fake_install)
    approvals = Approvals(tmp_path / "a.txt")
    approvals.add(app_digest(fab), "mine")
    edge_gate._guard_clientapp(approvals)
    with pytest.raises(edge_gate.AppNotApproved):
        runner.install_from_fab(rezip({**app_bundle.members(fab), "x.py": b""}), skip_prompt=True)
    assert installed == []  # nothing of the refused bundle reached Flower's installer
    modules = {m: sys.modules[m] for m in sys.modules if m.startswith("privfed")}
    try:
        runner.install_from_fab(fab, skip_prompt=True)
    finally:
        sys.modules.update(modules)  # the gate drops them so the bundle's own code loads
    assert installed == [fab]


def test_privfed_edge_does_not_start_without_an_approved_app(tmp_path, capsys):
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    argv = [
        "--superlink=l:1",
        f"--root-certificates={tmp_path / 'ca.crt'}",
        f"--auth-key={tmp_path / 'key'}",
        "--partition-id=0",
        "--num-partitions=1",
        f"--data-dir={tmp_path / 'device'}",
        "--epsilon=1",
    ]
    with pytest.raises(SystemExit, match="no app is approved"):
        edge.main(argv)


def test_privfed_app_approves_reviews_and_lists(fab, tmp_path, capsys):
    bundle = tmp_path / "privfed.fab"
    with pytest.raises(SystemExit) as done:
        app_cli.main(["build", "-o", str(bundle)])
    assert done.value.code == 0 and app_digest(bundle.read_bytes()) == app_digest(fab)
    with pytest.raises(SystemExit) as done:
        app_cli.main(["approved", "--data-dir", str(tmp_path)])
    assert done.value.code == 1
    tampered = tmp_path / "tampered.fab"
    members = app_bundle.members(fab)
    members["privfed/client/device.py"] += b"\n# changed\n"
    tampered.write_bytes(rezip(members))
    with pytest.raises(SystemExit):
        app_cli.main(["review", str(tampered)])
    assert "changed  privfed/client/device.py" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        app_cli.main(["approve", "--data-dir", str(tmp_path), "--fab", str(bundle)])
    with pytest.raises(SystemExit) as done:
        app_cli.main(["approve", "--data-dir", str(tmp_path), "--digest", "nope"])
    assert done.value.code == 2
    assert Approvals(tmp_path / "approved-apps.txt").approves(app_digest(fab))
    assert not Approvals(tmp_path / "approved-apps.txt").approves(app_digest(tampered.read_bytes()))
