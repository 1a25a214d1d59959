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
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("privfed-accountant: ")
