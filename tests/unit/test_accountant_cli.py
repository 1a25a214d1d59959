"""`privfed-accountant`: the numbers users reach for, against dp-accounting; `serve`'s start-up
errors (one line, exit 2, nothing created)."""

from __future__ import annotations

import socket

import dp_accounting
import pytest

from privfed.privacy.accountant_cli import main
from privfed.privacy.ledger import Ledger
from privfed.privacy.service.auth import add_token

from ..helpers import SmallDisk

EVENT = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0))


def test_epsilon_command_prints_dp_accounting_value(capsys):
    argv = ["epsilon", "-q", "0.01", "-s", "1.0", "-t", "10000", "-d", "1e-5"]
    assert main([*argv, "--method", "rdp"]) == 0
    printed = float(capsys.readouterr().out.strip())
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(EVENT, 10000)
    assert printed == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert main(argv) == 0  # pld, the default: dp-accounting's PLD at its own (finer) grid
    out = capsys.readouterr()
    tight = dp_accounting.pld.PLDAccountant()
    tight.compose(EVENT, 10000)
    assert float(out.out) == pytest.approx(tight.get_epsilon(1e-5), rel=2e-3)
    assert float(out.out) < 0.95 * printed and "PLD" in out.err


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_sigma_command_inverts_epsilon(capsys, method):
    assert (
        main(["sigma", "-q", "0.05", "-t", "200", "-e", "3", "-d", "1e-5", "--method", method]) == 0
    )
    sigma = float(capsys.readouterr().out.strip())
    main(["epsilon", "-q", "0.05", "-s", str(sigma), "-t", "200", "-d", "1e-5", "--method", method])
    assert float(capsys.readouterr().out.strip()) <= 3.0 + 1e-6
    smaller = str(sigma * 0.99)
    main(["epsilon", "-q", "0.05", "-s", smaller, "-t", "200", "-d", "1e-5", "--method", method])
    assert float(capsys.readouterr().out.strip()) > 3.0


@pytest.mark.parametrize(
    "argv",
    [
        ["epsilon", "-q", "1.5", "-s", "1", "-t", "10", "-d", "1e-5"],
        ["epsilon", "-q", "0.1", "-s", "-1", "-t", "10", "-d", "1e-5"],
        ["epsilon", "-q", "0.1", "-s", "1", "-t", "10", "-d", "2"],
        [
            "rqm",
            "-c",
            "1",
            "--range-extension",
            "0.5",
            "-m",
            "1",
            "-q",
            "0.5",
            "--sensitivity",
            "0.1",
            "--dims",
            "5",
            "-d",
            "1e-5",
        ],
        [
            "rqm",
            "-c",
            "1",
            "--range-extension",
            "0.5",
            "-m",
            "8",
            "-q",
            "0",
            "--sensitivity",
            "0.1",
            "--dims",
            "5",
            "-d",
            "1e-5",
        ],
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("privfed-accountant: ")


def test_rqm_command_converts_a_brute_force_rdp_curve_like_dp_accounting(capsys):
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    from .test_rqm import brute_force_rdp

    argv = ["rqm", "-c", "1", "--range-extension", "0.5", "-m", "5", "-q", "0.5"]
    argv += ["--sensitivity", "0.05", "--dims", "20", "--rounds", "3", "-d", "1e-5"]
    assert main(argv) == 0
    printed = float(capsys.readouterr().out.strip())
    orders = [2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0]
    curve = np.array([60 * brute_force_rdp(1.0, 0.5, 5, 0.5, 0.05, a) for a in orders])
    reference, _ = compute_epsilon(orders, curve, 1e-5)
    # ours uses every integer order up to 64 (and more): never looser than this subset
    assert printed <= reference * (1 + 1e-9)
    assert printed >= 0.9 * reference


# -- `serve`: every mistake is one line and exit 2, checked before anything is created ---------


def _serve(tmp_path, *extra: str, tokens: str | None = None, db: str | None = None) -> list[str]:
    tokens_file = tmp_path / "tokens.json"
    if tokens is not None:
        tokens_file.write_text(tokens)
    elif not tokens_file.exists():
        add_token(tokens_file, "operator", None)
    return [
        "serve",
        "--db",
        db or str(tmp_path / "ledger.sqlite"),
        "--tokens-file",
        str(tokens_file),
        *extra,
    ]


def _one_line_exit_2(argv, capsys, *words: str) -> str:
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("privfed-accountant: "), out.err
    assert "serving" not in out.out
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "tokens,words",
    [
        ("[]", ['{"tokens": [...]}']),
        ('{"tokens": "abc"}', ['{"tokens": [...]}']),
        ("{}", ['{"tokens": [...]}']),
        ('{"tokens": []}', ["no tokens"]),  # a service no token can use
        ('{"tokens": [{"role": "operator"}]}', ["tokens[0]", "sha256"]),
        ('{"tokens": [{"sha256": "' + "a" * 64 + '", "role": "client"}]}', ["client_id"]),
        ('{"tokens": [{"sha256": "' + "a" * 64 + '", "role": "root"}]}', ["role"]),
        ("not json", ["not JSON"]),
        ("\xff", ["tokens"]),
    ],
)
def test_serve_refuses_a_bad_tokens_file_before_creating_the_ledger(
    tmp_path, capsys, tokens, words
):
    _one_line_exit_2(_serve(tmp_path, tokens=tokens), capsys, "tokens", *words)
    assert not (tmp_path / "ledger.sqlite").exists()


def test_serve_refuses_a_ledger_path_it_cannot_use(tmp_path, capsys):
    (tmp_path / "a-directory").mkdir()
    _one_line_exit_2(_serve(tmp_path, db=str(tmp_path / "a-directory")), capsys, "--db", "folder")
    (tmp_path / "text.sqlite").write_text("not a database, just text\n" * 100)
    _one_line_exit_2(
        _serve(tmp_path, db=str(tmp_path / "text.sqlite")), capsys, "--db", "not a SQLite ledger"
    )
    assert (tmp_path / "text.sqlite").read_text().startswith("not a database")  # left as it was


def test_serve_refuses_a_read_only_ledger(tmp_path, capsys):
    with SmallDisk(tmp_path / "disk") as disk:
        ledger = Ledger(disk.path / "ledger.sqlite")
        ledger.set_budget("c", 1.0, 1e-5)
        ledger.close()  # a filesystem with a file open for writing cannot be remounted ro
        disk.read_only()
        _one_line_exit_2(
            _serve(tmp_path, db=str(disk.path / "ledger.sqlite")),
            capsys,
            "ledger.sqlite",
            "read-only filesystem",
        )


def test_serve_names_a_missing_or_wrong_certificate_file(tmp_path, capsys):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    _one_line_exit_2(
        _serve(tmp_path, "--certfile", str(cert), "--keyfile", str(key)), capsys, str(cert)
    )
    cert.write_text("junk")
    key.write_text("junk")
    _one_line_exit_2(
        _serve(tmp_path, "--certfile", str(cert), "--keyfile", str(key)), capsys, str(cert)
    )
    assert not (tmp_path / "ledger.sqlite").exists()


def test_serve_does_not_say_serving_when_the_port_is_taken(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _one_line_exit_2(_serve(tmp_path, "--port", str(port)), capsys, "--port", str(port))
    assert not list(tmp_path.glob("ledger.sqlite*"))  # a failed start leaves nothing behind


def test_serve_names_the_flag_and_the_file_in_the_way(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    db = str(tmp_path / "a-file" / "ledger.sqlite")
    _one_line_exit_2(_serve(tmp_path, db=db), capsys, "--db", str(tmp_path / "a-file"), "a file")
    _one_line_exit_2(_serve(tmp_path, "--max-client-bytes", "10"), capsys, "--max-client-bytes")
    _one_line_exit_2(_serve(tmp_path, "--pricing-quota-s", "0"), capsys, "--pricing-quota-s")
    _one_line_exit_2(_serve(tmp_path, "--pricing-quota-rate", "-1"), capsys, "--pricing-quota-rate")
    assert not list(tmp_path.glob("ledger.sqlite*"))
