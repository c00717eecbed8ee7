"""benchmarks/gpu_smoke.sh --cpu: the GPU smoke test's every step, run on the CPU (gloo) as a dry run."""
import os
import subprocess
import sys

from conftest import ROOT, shared_path


def test_gpu_smoke_script_dry_run_on_cpu():
    shared_path("weights", "stories260K_hf")
    done = subprocess.run(["bash", "benchmarks/gpu_smoke.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [line.split(": ", 1)[1][:2] for line in done.stdout.splitlines() if line.startswith("checked")] == \
        [f"{i}." for i in range(1, 8)]
    assert "gpu_smoke: all 7 steps passed on cpu" in done.stdout


def test_peak_table_tells_gpu_variants_apart():
    """MFU's denominator: the dense bf16 peak of the GPU torch names, NVL and PCIe boards told apart."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench
    peaks = {name: gpu_bench.peak_for(name) for name in (
        "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA H200 NVL",
        "NVIDIA L40", "NVIDIA L40S", "NVIDIA L4", "NVIDIA A100-SXM4-80GB", "NVIDIA A10G")}
    assert peaks == {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 NVL": 835.5, "NVIDIA H100 PCIe": 756.0,
                     "NVIDIA H200": 989.4, "NVIDIA H200 NVL": 835.5, "NVIDIA L40": 181.05, "NVIDIA L40S": 362.05,
                     "NVIDIA L4": 121.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A10G": None}
