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
    # how the fine-tuning runs trained: first -> last epoch means per init, and their curves
    assert re.search(r"\| AGW \| mmgl \| 1 \| 1 \| \d+\.\d\d -> \d+\.\d\d \|", text)
    assert "| AGW | random | 1 | 1 | " in text and (out / "finetune_curves.png").read_bytes()[:4] == b"\x89PNG"
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


def test_a_run_continued_under_a_new_name_is_read_whole_and_continues_from_its_newest_state(tmp_path):
    """A run continued from a _last.pth of an older name writes its later epochs and its next
    _last.pth under the new name: the study reads the epochs of both files (the later line of
    an epoch wins) and continues from the newest state, not the stale one."""
    import os
    from conftest import load_script
    study = load_script("tools/study.py")
    d = tmp_path / "run"
    (d / "log").mkdir(parents=True)
    line = lambda e, acc: json.dumps({"epoch": e, "step": 40 * (e + 1), "val/perm_acc": acc})   # noqa: E731
    (d / "log" / "old.jsonl").write_text("\n".join(line(e, 0.1) for e in range(3)) + "\n")
    (d / "log" / "old_144x72.jsonl").write_text("\n".join(line(e, 0.5) for e in (2, 3)) + "\n")
    os.utime(d / "log" / "old.jsonl", (1, 1))
    assert [(r["epoch"], r["val/perm_acc"]) for r in study.run_log(d)] == [(0, 0.1), (1, 0.1), (2, 0.5), (3, 0.5)]
    assert study.run_log(tmp_path / "nothing") == [] and study.last_state(d) is None
    for name, t in (("old_last.pth", 1), ("old_144x72_last.pth", 2)):
        (d / name).write_bytes(b"x")
        os.utime(d / name, (t, t))
    assert study.last_state(d).name == "old_144x72_last.pth"


def test_every_configuration_is_a_valid_pretraining_command():
    # a misspelt flag in a configuration would only show when its (hours-long) run starts;
    # two configurations with the same flags would be one run reported twice
    from conftest import load_script, pretrain_name
    study = load_script("tools/study.py")
    names = {}
    for config, (flags, label) in study.PRETRAIN.items():
        flags = ["40" if f == study.STEPS else f for f in flags]
        flags = ["data" if f == study.LLCM_DATA else f for f in flags]
        name = pretrain_name("--dataset", "sysu", "--data_path", "data", *flags)
        assert name not in names, f"{config} and {names[name]} are the same run ({name})"
        names[name] = config
        assert label


def test_ddag_variants_are_the_study_protocol_plus_their_own_flags(tmp_path):
    # the commands the study gives each fine-tuning method: the variant's flags after the
    # protocol's (so they win), its own folder, DDAG's script and folder, long = 2 x epochs
    from conftest import load_script
    study = load_script("tools/study.py")
    args = study.get_args_parser().parse_args(["--seeds", "1", "--ddag_seeds", "1", "--ft_epochs", "3",
                                               "--ddag_variants", "plain,warm,long"])
    jobs = study.finetune_jobs(tmp_path, tmp_path / "data", {"mmgl": tmp_path / "c.t", "random": None}, args)
    runs = {Path(log).parent.relative_to(tmp_path).as_posix(): (cmd, Path(cwd).name) for cmd, log, cwd in jobs}
    assert set(runs) == {f"{m}/{i}_seed0" for m in ("agw", "ddag", "ddag_plain", "ddag_warm", "ddag_long")
                         for i in ("mmgl", "random")}

    def opt(cmd, flag):   # the value argparse keeps: the last one given
        return cmd[max(i for i, a in enumerate(cmd) if a == flag) + 1]

    for run, (cmd, cwd) in runs.items():
        method = run.split("/")[0]
        assert cwd == ("AGW" if method == "agw" else "DDAG") and Path(cmd[1]).name == (
            "train.py" if method == "agw" else "train_ddag.py")
        assert ("--wpa" in cmd and "--graph" in cmd) == (method in ("ddag", "ddag_warm", "ddag_long"))
        assert opt(cmd, "--warmup_epochs") == ("2" if method == "ddag_warm" else "0")
        assert opt(cmd, "--epochs") == ("6" if method == "ddag_long" else "3")
        assert ("--resume" in cmd) == run.endswith("mmgl_seed0")


def test_pcc_loss_column_starts_where_pcc_switched_on():
    from conftest import load_script
    study = load_script("tools/study.py")
    waited = [{"train/pcc": 2.0, "train/pcc_weight": 0.0}, {"train/pcc": 0.4, "train/pcc_weight": 0.5},
              {"train/pcc": 0.1, "train/pcc_weight": 0.5}]
    assert study.pcc_span(waited) == "0.400 -> 0.100"
    assert study.pcc_span(waited[:1]) == "never on"           # not the weight-0 loss as if it were on
    assert study.pcc_span([{"train/pcc": 0.3}, {"train/pcc": 0.2}]) == "0.300 -> 0.200"   # older logs
    assert study.pcc_span([{"train/perm": 0.1}]) == "–"
