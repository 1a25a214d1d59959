"""`privfed-accountant`: the numbers users reach for, against dp-accounting."""

from __future__ import annotations

import dp_accounting
import pytest

from privfed.privacy.accountant_cli import main
from privfed.privacy.events import ORDERS


def test_epsilon_command_prints_dp_accounting_value(capsys):
    assert main(["epsilon", "-q", "0.01", "-s", "1.0", "-t", "10000", "-d", "1e-5"]) == 0
    printed = float(capsys.readouterr().out.strip())
    acc = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 10000
    )
    assert printed == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_sigma_command_inverts_epsilon(capsys):
    assert main(["sigma", "-q", "0.05", "-t", "200", "-e", "3", "-d", "1e-5"]) == 0
    sigma = float(capsys.readouterr().out.strip())
    main(["epsilon", "-q", "0.05", "-s", str(sigma), "-t", "200", "-d", "1e-5"])
    assert float(capsys.readouterr().out.strip()) <= 3.0 + 1e-6


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
