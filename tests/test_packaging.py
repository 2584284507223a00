"""Packaging: kernels/ ships as lrcomp.kernels only, and importing lrcomp stays light."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_kernels_as_subpackage_only(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("lrcomp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"lrcomp", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "lrcomp/kernels/gemm.py" in names and "lrcomp/kernels/lowrank_linear.py" in names
    assert not any(n.startswith("kernels/") for n in names)


def test_import_does_not_load_triton_or_cuda(tmp_path):
    code = (
        "import sys, torch, lrcomp\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import time'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
