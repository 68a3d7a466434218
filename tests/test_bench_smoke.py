"""The training and test benchmarks run end to end at their smallest sizes and end with
their headline line (the measured figures themselves live in bench/RESULTS.md: timing is
for benchmarks, never for tests)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script, *args):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--threads", "1", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout.strip().splitlines()


def test_bench_train_smallest_run_prints_every_row_and_the_headline():
    lines = run_bench("bench_train.py", "--img_h", "48", "--img_w", "24", "--batch-size", "4",
                      "--num_pos", "2", "--steps", "1", "--warmup", "1", "--repeat", "1",
                      "--aug_batch", "8", "--aug_repeat", "1", "--workers", "1")
    text = "\n".join(lines)
    for row in ("1 core each (ours 1 thread, ref in-process)",
                "1 cores each (ours 1 threads, ref DataLoader 1 workers)",
                "ours 1 thread vs ref DataLoader 1 workers", "MMGL pre-training step (4+4 img)",
                "AGW fine-tuning step (4+4 img)"):
        assert row in text, text
    # CPU headline: the data pipeline, as '<what>: N.Nx (A img/s vs B img/s)'
    assert re.fullmatch(r"data pipeline on cpu .*: \d+\.\dx \([\d,]+ img/s vs [\d,]+ img/s\)",
                        lines[-1]), lines[-1]


def test_bench_test_smallest_run_agrees_with_the_authors_way():
    lines = run_bench("bench_test.py", "--img_h", "32", "--img_w", "16", "--test-batch", "16",
                      "--num_query", "40", "--num_ids", "4", "--folders", "8",
                      "--files_per_folder", "3", "--trials", "2")
    assert re.fullmatch(r"full SYSU test \(2 trials\): \d+\.\dx \(\d+\.\d s vs \d+\.\d s\)",
                        lines[-1]), lines[-1]
    # both fp32 on the same network and images: the same mean metrics
    checks = [line for line in lines if line.startswith("check ")]
    assert len(checks) == 2
    for line in checks:
        pairs = re.findall(r"([\d.]+)% vs ([\d.]+)%", line)
        assert len(pairs) == 3 and all(a == b for a, b in pairs), line
