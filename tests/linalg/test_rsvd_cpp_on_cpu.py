"""csrc/rsvd.cpp compiled for the CPU (g++, no CUDA) must equal the PyTorch reference bit for bit.

The C++ rsvd is plain ATen, so its CPU registration can be built and checked on any machine
with a C++ compiler. It runs in a subprocess so that the ops it registers do not make
``lrcomp.has_cuda_ext()`` report True in this test process. Slow: the first build takes ~1 min.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"

SCRIPT = r"""
import sys, torch
from torch.utils import cpp_extension
cpp_extension.load(name="lrcomp_cpu_check", sources=[sys.argv[1] + "/register.cpp", sys.argv[1] + "/rsvd.cpp"],
                   build_directory=sys.argv[2], is_python_module=False, extra_cflags=["-O1"])
import lrcomp  # the Python FRAGMENT of the namespace coexists with the C++ TORCH_LIBRARY
from lrcomp import _ext
from lrcomp.ops import rsvd as R
assert _ext._ops_registered() and hasattr(torch.ops.lrcomp, "lowrank_linear_fwd")
_ext._register_fakes()
g = torch.Generator().manual_seed(0)
for A in (torch.randn(3, 120, 90, generator=g), torch.randn(70, 150, generator=g, dtype=torch.float64)):
    om = R.draw_sketch(A.shape[-1], 28, g, A.device)
    for ortho in ("householder", "cholqr2"):
        got = torch.ops.lrcomp.rsvd(A, om, 20, 2, ortho)
        ref = R.rsvd_reference(A, om, 20, 2, ortho)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), ortho
A = torch.randn(2, 40, 30, generator=g)
om = R.draw_sketch(30, 10, g, A.device)
res = torch.library.opcheck(torch.ops.lrcomp.rsvd.default, (A, om, 5, 1, "cholqr2"))
assert all(v == "SUCCESS" for v in res.values()), res
for bad, msg in (((A[0, 0], om, 5, 1), "A must be 2-D"), ((A, om, 11, 1), "rank must be in"),
                 ((A, om[:-1], 5, 1), "omega must have n = 30 rows")):
    try:
        torch.ops.lrcomp.rsvd(*bad)
    except RuntimeError as exc:
        assert msg in str(exc), str(exc)
    else:
        raise AssertionError("no error for " + msg)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")
def test_cpp_rsvd_equals_reference_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(CSRC), str(tmp_path)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
