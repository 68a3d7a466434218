"""The training and test benchmarks run end to end at their smallest sizes and end with
their headline line (the measured figures themselves live in bench/RESULTS.md: timing is
for benchmarks, never for tests)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

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
                "ours 1 thread vs ref DataLoader 1 workers",
                "MMGL pre-training step (4+4 img; 1 and 1 steps counted; diagnostics and "
                "decoding off on both sides)", "AGW fine-tuning step (4+4 img; 1 and 1 steps counted)"):
        assert row in text, text
    # CPU headline: the data pipeline, as '<what>: N.Nx (A img/s vs B img/s)'
    assert re.fullmatch(r"data pipeline on cpu .*: \d+\.\dx \([\d,]+ img/s vs [\d,]+ img/s\)",
                        lines[-1]), lines[-1]


def test_bench_train_rates_divide_by_the_steps_each_side_ran(monkeypatch):
    """Both training-step comparisons, in process at a tiny size: each side's timed run ran
    exactly --steps steps (counted by the bench, and independently here by every optimiser
    step taken), the rates printed and returned are the counted images and steps over the
    measured seconds, and our MMGL side decodes nothing and runs no gradient diagnostic, as
    the reference. (The bug it guards: ours ran an epoch of max(warmup, steps) + 2 steps and
    was divided by --steps.)"""
    sys.path.insert(0, str(ROOT))
    import train
    from bench import bench_train
    steps, warmup, repeat, batch = 2, 1, 1, 4
    args = bench_train.resolve_defaults(bench_train.get_parser().parse_args(
        ["--img_h", "48", "--img_w", "24", "--batch-size", str(batch), "--num_pos", "2",
         "--steps", str(steps), "--warmup", str(warmup), "--repeat", str(repeat), "--workers", "0",
         "--parts", "mmgl,agw"]))
    import diagnostics
    extra_work = []
    for module, name in ((train, "perm_accuracy"), (diagnostics, "loss_gradients")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k:
                            extra_work.append(_name) or _real(*a, **k))
    optimizer_steps = [0]
    hook = register_optimizer_step_post_hook(
        lambda *_: optimizer_steps.__setitem__(0, optimizer_steps[0] + 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for bench in (bench_train.bench_mmgl, bench_train.bench_agw):
            rows, extra = [], []
            optimizer_steps[0] = 0
            label, ours_ips, ref_ips, timing = bench(args, torch.device("cpu"), rows, extra)
            # ours: the warm-up and `repeat` timed runs; the reference: `repeat` runs of
            # warm-up + timed steps
            assert optimizer_steps[0] == warmup + repeat * steps + repeat * (warmup + steps), label
            for t, ips, shown in ((timing["ours"], ours_ips, rows[0][1]),
                                  (timing["reference"], ref_ips, rows[0][2])):
                assert (t.steps, t.images) == (steps, steps * 2 * batch), (label, t)
                assert t.seconds > 0 and ips == pytest.approx(t.images / t.seconds), (label, t, ips)
                assert shown == f"{t.steps / t.seconds:.2f} step/s = {t.images / t.seconds:,.1f} img/s"
            assert f"; {steps} and {steps} steps counted" in rows[0][0], rows[0][0]
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    assert extra_work == [], extra_work


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
