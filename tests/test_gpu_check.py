"""benchmarks/gpu_check.sh and its driver benchmarks/gpu_check.py, checked on the CPU: the script
parses, the driver's dry run (tiny generated data, CPU) times pyro-scvi end to end and reports a
missing scvi-tools side as skipped, and the table marks what did not run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)


def test_dry_run_times_training_and_de_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
         "--epochs", "1", "--threads", "1", "--scvi-python", str(tmp_path / "no-python"),
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [case["n_genes"] for case in result["cases"]] == [0, gpu_check.TINY["top"]]
    for case in result["cases"]:
        assert set(case["results"]) == {"pyro"}
        pyro = case["results"]["pyro"]
        assert pyro["status"] == "ok" and pyro["device"] == "cpu" and pyro["epochs"] == 1
        assert pyro["shape"] == [gpu_check.TINY["cells"], case["n_genes"] or gpu_check.TINY["genes"]]
        assert pyro["s_per_epoch"] > 0 and pyro["de_s"] > 0 and pyro["de_shape"][0] > 0
        assert pyro["peak_train_mb"] is None  # no GPU memory on the CPU
    assert result["scvi_tools"].startswith("skipped: ") and "no-python does not exist" in result["scvi_tools"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown == gpu_check.report(result) + "\n" and markdown in done.stdout
    assert (tmp_path / "workers.log").exists()


def test_the_table_marks_what_did_not_run():
    ok = {"status": "ok", "first_epoch_s": 2.0, "s_per_epoch": 0.5, "de_s": 3.0, "peak_train_mb": 100.0,
          "peak_de_mb": None}
    cases = [{"label": "A", "results": {"pyro": ok, "scvi": dict(ok, s_per_epoch=1.0, de_s=6.0)}},
             {"label": "B", "results": {"pyro": ok, "scvi": {"status": "timeout"}}},
             {"label": "C", "results": {"pyro": {"status": "failed"}}}]
    rows = gpu_check.table(cases).splitlines()[2:]
    assert len(rows) == 3 * len(gpu_check.ROWS)
    assert rows[1] == "|  | s/epoch | 0.500 | 1.000 | 0.50 |"
    assert rows[2] == "|  | DE one-vs-rest vanilla, s | 3.00 | 6.00 | 0.50 |"
    assert rows[4] == "|  | peak GPU MiB, DE | n/a | n/a | n/a |"
    assert rows[6] == "|  | s/epoch | 0.500 | timeout | n/a |"
    assert rows[10] == "| C | first epoch, s (warm-up) | failed | skipped | n/a |"
