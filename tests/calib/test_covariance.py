"""CovarianceAccumulator on the CPU reference: precision, streaming, resume, bad input."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrcomp.calib import CovarianceAccumulator
from lrcomp.ops import covariance as cov_ops


def exact(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).double()
    return x2.T @ x2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_within_1e6_relative_of_fp64_on_the_same_rounded_inputs(dtype):
    # 20000 tokens span three fp32 folds; the mean offset makes the matrix far from diagonal.
    x = (torch.randn(20000, 96) + 0.5).to(dtype)
    acc = CovarianceAccumulator(96)
    acc.update(x)
    C = acc.covariance(normalize=False)
    assert C.dtype == torch.float64 and C.shape == (96, 96)
    assert rel(C, exact(x)) <= 1e-6
    assert torch.equal(C, C.T)


def test_normalize_divides_by_count_and_leading_dims_flatten():
    x = torch.randn(3, 7, 33).to(torch.bfloat16)
    acc = CovarianceAccumulator(33)
    acc.update(x)
    assert acc.count == 21
    torch.testing.assert_close(acc.covariance(), acc.covariance(normalize=False) / 21)
    torch.testing.assert_close(acc.covariance(), exact(x) / 21, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dim", [1, 37, 600, 1100])
def test_odd_and_multi_block_widths(dim):
    x = torch.randn(300, dim)
    acc = CovarianceAccumulator(dim)
    acc.update(x)
    assert rel(acc.covariance(normalize=False), exact(x)) <= 1e-6
    # Only the upper triangle is stored; the strict lower part stays zero.
    master = acc.state_dict()["sum"]
    assert torch.count_nonzero(master.tril(-1)) == 0


def test_reference_computes_one_triangle_only():
    master = torch.zeros(5, 5, dtype=torch.float64)
    x = torch.arange(10.0).reshape(2, 5)
    cov_ops.covariance_update_reference(master, x)
    torch.testing.assert_close(master, exact(x).triu())


def test_streaming_over_a_million_tokens_equals_one_shot():
    tokens, dim = 1_100_003, 16
    x = (torch.randn(tokens, dim) * torch.linspace(0.1, 3.0, dim) + 1.0).to(torch.bfloat16)
    one = CovarianceAccumulator(dim)
    one.update(x)
    streamed = CovarianceAccumulator(dim)
    for chunk in torch.split(x, 9973):
        streamed.update(chunk)
    assert one.count == streamed.count == tokens
    ref = exact(x)
    assert rel(one.covariance(normalize=False), ref) <= 1e-6
    assert rel(streamed.covariance(normalize=False), ref) <= 1e-6
    assert rel(streamed.covariance(), one.covariance()) <= 1e-6


def test_state_dict_resume_through_safetensors(tmp_path):
    batches = [torch.randn(257, 24).to(torch.bfloat16) for _ in range(6)]
    full = CovarianceAccumulator(24)
    for b in batches:
        full.update(b)

    first = CovarianceAccumulator(24)
    for b in batches[:3]:
        first.update(b)
    save_file(first.state_dict(), tmp_path / "cov.safetensors")  # a long calibration checkpoints...
    resumed = CovarianceAccumulator(24)
    resumed.load_state_dict(load_file(tmp_path / "cov.safetensors"))  # ...and goes on after a restart
    assert resumed.count == 3 * 257
    for b in batches[3:]:
        resumed.update(b)
    assert resumed.count == full.count
    assert torch.equal(resumed.covariance(), full.covariance())


def test_reset_and_empty_update():
    acc = CovarianceAccumulator(4)
    acc.update(torch.empty(0, 4))
    assert acc.count == 0
    acc.update(torch.ones(2, 4))
    acc.reset()
    assert acc.count == 0 and torch.count_nonzero(acc.covariance(normalize=False)) == 0


def test_output_gradient_covariance():
    # The same accumulator collects G^T G from a backward hook.
    layer = torch.nn.Linear(8, 12)
    acc = CovarianceAccumulator(12)
    grads = []

    def hook(module, grad_input, grad_output):
        acc.update(grad_output[0])
        grads.append(grad_output[0])

    layer.register_full_backward_hook(hook)
    for _ in range(3):
        layer(torch.randn(5, 8, requires_grad=True)).square().sum().backward()
    G = torch.cat(grads)
    assert acc.count == 15
    torch.testing.assert_close(acc.covariance(normalize=False), exact(G), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- bad input
def test_width_mismatch_names_x():
    acc = CovarianceAccumulator(16)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., dim=16\], got shape \(4, 15\)"):
        acc.update(torch.randn(4, 15))


def test_other_bad_input():
    with pytest.raises(TypeError, match="dim must be an int"):
        CovarianceAccumulator(4.0)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        CovarianceAccumulator(0)
    acc = CovarianceAccumulator(4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        acc.update([[1.0] * 4])
    with pytest.raises(TypeError, match="x must be bfloat16, float16 or float32"):
        acc.update(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be bfloat16, float16 or float32"):
        acc.update(torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs at least one token"):
        acc.covariance()
    with pytest.raises(ValueError, match=r"state\['sum'\] must be a \[4, 4\] tensor"):
        acc.load_state_dict({"sum": torch.zeros(3, 3), "count": torch.tensor(1)})
    with pytest.raises(ValueError, match="keys 'sum' and 'count'"):
        acc.load_state_dict({})
    with pytest.raises(RuntimeError, match="torch.distributed to be initialised"):
        acc.all_reduce_()
