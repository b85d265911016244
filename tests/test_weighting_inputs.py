"""Every way of calling a weighting checks its inputs exactly once, and refuses bad ones."""

from __future__ import annotations

import sys

import pytest
import torch
from _weighting_cases import random_problem
from torch import Tensor

import emtl_kernels.weightings
from emtl_kernels.weightings import WEIGHTINGS, FunctionWeighting, Weighting
from emtl_kernels.weightings.base import check_weighting_inputs


@pytest.fixture
def check_count(monkeypatch) -> list[int]:
    """Counts the calls of ``check_weighting_inputs``, wherever a weighting module imported it."""
    calls = [0]

    def counted(losses: Tensor, gram: Tensor) -> None:
        calls[0] += 1
        check_weighting_inputs(losses, gram)

    prefix = emtl_kernels.weightings.__name__ + "."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and hasattr(module, "check_weighting_inputs"):
            monkeypatch.setattr(module, "check_weighting_inputs", counted)
    return calls


class Doubled(Weighting):
    """A weighting written outside the package: its ``weights`` does not check."""

    def weights(self, losses: Tensor, gram: Tensor) -> Tensor:
        return 2 * losses


def problem() -> tuple[Tensor, Tensor]:
    losses, _, gram = random_problem(3, seed=5)
    return losses.float(), gram


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_weighting_instance_checks_once(name, check_count):
    WEIGHTINGS[name]()(*problem())
    assert check_count[0] == 1


#: Every public ``*_weights`` function: each checks its inputs once when called directly, and a
#: weighting built on one (a FunctionWeighting) leaves the check to it.
PUBLIC_FUNCTIONS = [name for name in emtl_kernels.weightings.__all__ if name.endswith("_weights")]


def test_every_function_weighting_has_its_public_function():
    for cls in WEIGHTINGS.values():
        if issubclass(cls, FunctionWeighting):
            assert cls.function.__name__ in PUBLIC_FUNCTIONS, cls


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_weights_function_checks_once(name, check_count):
    getattr(emtl_kernels.weightings, name)(*problem())
    assert check_count[0] == 1


def test_weighting_subclass_checks_once(check_count):
    losses, gram = problem()
    torch.testing.assert_close(Doubled()(losses, gram), 2 * losses)
    assert check_count[0] == 1


@pytest.mark.parametrize("weighting", [*(cls() for cls in WEIGHTINGS.values()), Doubled()], ids=repr)
@pytest.mark.parametrize(
    "losses,gram,error",
    [
        (torch.ones(3), torch.eye(2), "gram must be"),
        (torch.ones(3, 1), torch.eye(3), "losses must be"),
        (torch.ones(0), torch.eye(0), "losses must be"),
        (torch.ones(3, dtype=torch.int64), torch.eye(3), "floating"),
        (torch.ones(3), torch.eye(3, device="meta"), "losses are on"),
    ],
)
def test_weighting_refuses_bad_inputs(weighting, losses, gram, error):
    with pytest.raises((ValueError, TypeError), match=error):
        weighting(losses, gram)
