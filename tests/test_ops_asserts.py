"""The parity asserts fail where a result leaves its bound, and name the worst element."""

from __future__ import annotations

import pytest
import torch
from _asserts import GRAM_RTOL, assert_combine_close, assert_gram_close, assert_sq_norms_close, combine64

EXACT = torch.tensor([[1.0, 2.0, -3.0], [0.5, 0.0, 4.0]], dtype=torch.float64)


def test_gram_off_its_bound_names_the_worst_entry():
    gram = (EXACT @ EXACT.T).float()
    assert_gram_close(gram, EXACT)
    scale = float((EXACT @ EXACT.T).diagonal().prod().sqrt())
    gram[1, 0] += 3 * GRAM_RTOL * scale
    gram[0, 1] += 1.5 * GRAM_RTOL * scale
    with pytest.raises(
        AssertionError,
        match=r"2 of 4 elements .* worst at index \(1, 0\): got -11.49.* float64 -11.5, .*\(3× the bound\)",
    ):
        assert_gram_close(gram, EXACT)


def test_non_finite_results_fail():
    norms = EXACT.square().sum(dim=1).float()
    assert_sq_norms_close(norms, EXACT)
    norms[0] = float("nan")
    with pytest.raises(AssertionError, match=r"1 of 2 elements .* worst at index \(0,\): got nan"):
        assert_sq_norms_close(norms, EXACT)
    with pytest.raises(AssertionError, match="float32"):
        assert_sq_norms_close(norms.double(), EXACT)


def test_combine_off_its_bound_names_the_output_and_element():
    weights = torch.tensor([2.0, -1.0])
    expected, scale = combine64(EXACT, weights)
    outs = [expected[:1].to(torch.bfloat16), expected[1:].to(torch.bfloat16)]
    assert_combine_close(outs, expected, scale, torch.bfloat16)
    outs[1][1] += 0.25
    with pytest.raises(AssertionError, match="worst at element 1 of output 1"):
        assert_combine_close(outs, expected, scale, torch.bfloat16)
