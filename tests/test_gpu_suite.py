"""benchmarks/gpu_suite.sh in its dry run (GPU_SUITE_DRYRUN=1): the same steps on the CPU, so the
script that a 15-minute GPU lease depends on cannot rot. It must leave exactly summary.md and
gpu_suite.tar.gz, fail no step, and fetch nothing."""
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from grl_kernels.backends.extension import source_root

ROOT = source_root()
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


def test_script_fetches_nothing():
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\b(curl|wget|git (clone|fetch|pull)|hf_hub|huggingface-cli)\b", code)
    for line in re.findall(r".*pip install.*", code):
        assert "--no-index" in line and "--no-deps" in line and "--no-build-isolation" in line, line
    assert "PIP_NO_INDEX=1" in code


@pytest.mark.skipif(shutil.which("bash") is None or os.environ.get("GRL_KERNELS_NO_JIT") == "1",
                    reason="needs bash and the just-in-time builds")
def test_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, GPU_SUITE_DRYRUN="1", PYTHON=sys.executable, PYTHONPATH=str(ROOT), TOTAL_BUDGET="900")
    res = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-2000:])
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.tar.gz", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| step | rc |" in summary
    with tarfile.open(out / "gpu_suite.tar.gz") as tar:
        names = set(tar.getnames())
        steps = tar.extractfile("gpu_suite/steps.tsv").read().decode().splitlines()[1:]
    for f in ["steps.tsv", "versions.txt", "info.json", "check.json", "check.md", "tests_gpu.xml", "summary.json",
              "bench_cpu_bf16.json", "summary.md"]:
        assert f"gpu_suite/{f}" in names, (f, sorted(names))
    table = {line.split("\t")[0]: line.split("\t") for line in steps}
    for must_run in ["install", "info", "tests_gpu", "check", "bench_bf16"]:
        assert table[must_run][1] == "0", table[must_run]
    for skipped in ["memcheck", "racecheck", "static_report", "tests_rest"]:
        assert table[skipped][1] == "skipped" and table[skipped][4], table[skipped]  # with a reason
    assert all(row[1] in ("0", "skipped") for row in table.values()), table
