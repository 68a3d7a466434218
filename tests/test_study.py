"""tools/study.py end to end on a tiny synthetic set: data, pre-training with the held-out
accuracy, AGW fine-tuning from the chosen checkpoint and from random weights, the report,
the plot, and a re-run that finds everything done."""
import json
import re
from pathlib import Path

from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_study_runs_reports_and_resumes(tmp_path):
    # with the transfer row: pre-trained on LLCM (2 steps an epoch), AGW fine-tuned from it too
    args = ["--out", tmp_path / "study", "--num_ids", "12", "--epochs", "1", "--ft_epochs", "1",
            "--seeds", "1", "--ddag_seeds", "0", "--configs", "gap_k6_pcc,gap_k3_pcc,gap_k6_default_llcm",
            "--ft_from", "gap_k6_pcc", "--ft_also", "gap_k6_default_llcm", "--steps_per_epoch", "2", "--jobs", "1"]
    res = run_script(ROOT / "tools" / "study.py", *args)
    out = tmp_path / "study"
    assert "==> pre-training: 3 run(s) to do" in res.stdout
    assert "==> fine-tuning from gap_k6_pcc: 3 run(s) to do" in res.stdout
    text = (out / "results.md").read_text()
    assert "| GAP, K=6, PCC first reading (the paper's configuration) | " in text
    assert "| GAP, K=3, PCC first reading | " in text
    assert "## Mechanism diagnostics" in text and (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert "| head units alive |" in text and re.search(r"\| \d+% -> – \|\n", text)   # epoch 1 -> (one epoch)
    assert "| AGW | 1 | " in text   # the paired (per-seed) MMGL - random difference
    assert "| AGW | mmgl | 1 | " in text and "| AGW | random | 1 | " in text
    assert "## Feature scale at the first fine-tuning step" in text
    assert "## Transfer and data efficiency (AGW on SYSU-MM01)" in text
    assert "| GAP, K=6, default PCC, pre-trained on LLCM only (transfer) | 2 | " in text
    assert "| random weights | – | – | 1 | " in text
    llcm = [json.loads(x) for x in next((out / "pretrain" / "gap_k6_default_llcm" / "log").glob("*.jsonl"))
            .read_text().splitlines()]
    assert llcm[-1]["step"] == 2 and "LLCM" in (out / "pretrain" / "gap_k6_default_llcm" / "run.log").read_text()
    png = (out / "pretrain_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    scale = json.loads((out / "feature_scale.json").read_text())
    assert set(scale) == {"gap_k6_pcc", "gap_k6_default_llcm", "random"} and scale["gap_k6_pcc"]["feature norm"] > 0
    # every JSON line of the pre-training carries the held-out accuracy
    log = [json.loads(x) for x in next((out / "pretrain" / "gap_k6_pcc" / "log").glob("*.jsonl"))
           .read_text().splitlines()]
    assert len(log) == 1 and 0 <= log[0]["val/perm_acc"] <= 1
    # a second run finds every run finished and only rewrites the report
    again = run_script(ROOT / "tools" / "study.py", *args)
    assert "==> pre-training: 0 run(s) to do" in again.stdout
    assert "==> fine-tuning from gap_k6_pcc: 0 run(s) to do" in again.stdout
    # --ft_also must name a configuration the study pre-trains
    bad = run_script(ROOT / "tools" / "study.py", "--out", tmp_path, "--configs", "gap_k6_pcc", "--ft_also",
                     "gap_k6_default_llcm", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: --ft_also gap_k6_default_llcm: not among --configs")


def test_study_unknown_config_is_one_error_line(tmp_path):
    res = run_script(ROOT / "tools" / "study.py", "--out", tmp_path, "--configs", "nope", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --configs: unknown configuration 'nope'")
