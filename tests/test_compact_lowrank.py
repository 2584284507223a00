"""lrcomp.compact_lowrank: pruned layers shrink in place and the output is kept."""

import torch

import lrcomp


def test_compact_lowrank_shrinks_only_pruned_layers_and_keeps_output():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 10))
    lrcomp.replace_linears(model, 8, target_modules=["0", "2"])
    model[0].prune_(5)
    x = torch.randn(4, 30)
    before = model(x)
    assert lrcomp.compact_lowrank(model) == ["0"]
    assert model[0].rank == 5 and model[2].rank == 8
    assert torch.allclose(model(x), before, atol=1e-6)
    assert model[0].num_parameters(compact=False) == 5 * (30 + 20 + 2) + 20
