"""Helpers shared by the joint methods."""

from __future__ import annotations

import pytest
from torch import nn

from lrcomp.methods.base import swapped_modules


def test_swapped_modules_puts_the_originals_back_even_on_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    first, last = model[0], model[2]
    stand_in = nn.Linear(4, 4)
    with swapped_modules(model, {"0": stand_in}):
        assert model[0] is stand_in and model[2] is last
        model.set_submodule("0", nn.Identity())  # whatever the block puts there is replaced too
    assert model[0] is first
    with pytest.raises(RuntimeError, match="boom"), swapped_modules(model, {"2": nn.Identity()}):
        raise RuntimeError("boom")
    assert model[2] is last and model[0] is first
    with pytest.raises(AttributeError):  # a name that is not in the model: nothing swapped
        with swapped_modules(model, {"9": stand_in}):
            pass
    assert list(model) == [first, model[1], last]
