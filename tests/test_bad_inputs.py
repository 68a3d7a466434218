"""The bad inputs of docs/RELIABILITY.md's table: each ends in ONE line 'error: ...' on
stderr (at most ~200 characters), exit status 2, no traceback. Run as a script
(``python tests/test_bad_inputs.py DATA_DIR``) it prints the table's Markdown rows from
the real messages."""
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_ARGS, run_script

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--arch", "resnet18", "--img_h", "96", "--img_w", "48", "--gpu", "cpu", "--workers", "0"]

# (what, script, args, needle); {data}: a preprocessed synthetic SYSU-MM01 at 96x48, {raw}: one
# without its npy files, {tmp}: an empty folder, {text}: a text file, {cut}: a truncated
# checkpoint, {plain}: a plain state_dict (a pre-training .t), {blocker}: a file, {folder}: an
# unlabelled image folder preprocessed at 48x24, {onergb}: a folder with rgb/ images only.
CASES = [
    ("unknown --dataset", "train.py", ["--dataset", "market"], "--dataset must be one of"),
    ("unknown --stream", "train.py", ["--stream", "three"], "--stream must be one of"),
    ("unknown --arch", "train.py", ["--arch", "resnet101"], "--arch must be one of"),
    ("--num_stripe not dividing --img_h", "train.py", ["--num_stripe", "5"], "--num_stripe must be >= 2 and divide"),
    ("negative --lr", "train.py", ["--lr", "-0.1"], "--lr must be positive"),
    ("negative --workers", "train.py", ["--workers", "-1"], "--workers must be >= 0"),
    ("zero --batch-size", "train.py", ["--batch-size", "0"], "--batch_size must be >= 1"),
    ("unknown --perm_feat", "train.py", ["--perm_feat", "mean"], "--perm_feat must be one of"),
    ("negative --val_images", "train.py", ["--val_images", "-1"], "--val_images must be >= 0"),
    ("unknown flag", "train.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("non-numeric --lr", "train.py", ["--lr", "abc"], "invalid float value"),
    ("missing dataset folder", "train.py", ["--data_path", "{tmp}/nowhere"], "dataset folder not found"),
    ("SYSU-MM01 not preprocessed", "train.py", ["--data_path", "{raw}"], "run: python pre_process_sysu.py"),
    ("--img_h/--img_w other than the arrays", "train.py", ["--img_h", "120", "--img_w", "60"],
     "holds 96x48 images but --img_h/--img_w ask for 120x60"),
    ("--resume file that does not exist", "train.py", ["--resume", "nope_last.pth"], "no such checkpoint file"),
    ("--resume a text file", "train.py", ["--resume", "{text}"], "is not a PyTorch checkpoint"),
    ("--resume a text file, --trust-checkpoint", "train.py", ["--resume", "{text}", "--trust-checkpoint"],
     "is not a PyTorch checkpoint"),
    ("--resume a truncated checkpoint", "train.py", ["--resume", "{cut}"], "truncated or corrupt"),
    ("--resume a plain state_dict", "train.py", ["--resume", "{plain}"], "not a resumable pre-training checkpoint"),
    ("--model_path that cannot be created", "train.py", ["--model_path", "{blocker}/sm"], "is not writable"),
    ("--log_path that cannot be created", "train.py", ["--log_path", "{blocker}/log"], "is not writable"),
    ("--batch-size 1", "AGW/train.py", ["--batch-size", "1"], "--batch-size must be >= 2"),
    ("negative --lr", "AGW/train.py", ["--lr", "-0.1"], "--lr must be positive"),
    ("--resume a text file", "AGW/train.py", ["--resume", "{text}"], "is not a PyTorch checkpoint"),
    ("--resume a file matching no backbone key", "AGW/train.py", ["--resume", "{alien}"],
     "matches no backbone key"),
    ("--model_path that cannot be created", "AGW/train.py", ["--model_path", "{blocker}/sm"], "is not writable"),
    ("RegDB --trial 11", "AGW/train.py", ["--dataset", "regdb", "--trial", "11", "--data_path", "{tmp}"],
     "--trial must be 1..10"),
    ("missing dataset folder", "AGW/train.py", ["--data_path", "{tmp}/nowhere"], "dataset folder not found"),
    ("--img_h/--img_w other than the arrays", "AGW/train.py", ["--img_h", "120", "--img_w", "60"],
     "holds 96x48 images but --img_h/--img_w ask for 120x60"),
    ("without --resume", "AGW/test.py", [], "--resume CKPT is required"),
    ("--resume a text file", "AGW/test.py", ["--resume", "{text}"], "is not a PyTorch checkpoint"),
    ("--resume a file matching no backbone key", "AGW/test.py", ["--resume", "{alien}"],
     "matches no backbone key"),
    ("--resume a pre-training checkpoint of another --arch", "AGW/test.py", ["--resume", "{r50}"],
     "holds a resnet50 backbone"),
    ("missing dataset folder", "AGW/test.py", ["--resume", "{r18}", "--data_path", "{tmp}/nowhere"],
     "dataset folder not found"),
    ("--resume a file matching no backbone key", "DDAG/train_ddag.py", ["--resume", "{alien}"],
     "matches no backbone key"),
    ("SYSU-MM01 not preprocessed", "DDAG/train_ddag.py", ["--data_path", "{raw}"], "run: python pre_process_sysu.py"),
    ("negative --lambda0", "DDAG/train_ddag.py", ["--lambda0", "-1"], "--lambda0 must be >= 0"),
    ("without --resume", "DDAG/test_ddag.py", [], "--resume CKPT is required"),
    ("--resume a truncated checkpoint", "DDAG/test_ddag.py", ["--resume", "{cut}"], "truncated or corrupt"),
    ("unknown --dataset", "tools/make_synthetic.py", ["--dataset", "x", "--out", "{tmp}/s"],
     "invalid choice: 'x'"),
    ("non-numeric --img_h", "pre_process_sysu.py", ["--img_h", "tall"], "invalid int value"),
    ("missing dataset folder", "pre_process_sysu.py", ["--data_path", "{tmp}/nowhere"],
     "dataset folder not found"),
    ("a folder that is not SYSU-MM01", "pre_process_sysu.py", ["--data_path", "{tmp}"], "no cam1..cam6/ folders"),
    ("--img_h 0", "pre_process_sysu.py", ["--data_path", "{raw}", "--img_h", "0"], "too small: 0x144"),
    ("--dataset folder without --data_path", "pre_process_sysu.py", ["--dataset", "folder"],
     "--dataset folder needs --data_path"),
    ("a folder without rgb/ and ir/", "pre_process_sysu.py", ["--dataset", "folder", "--data_path", "{tmp}"],
     "no RGB images under"),
    ("a folder with RGB images only", "pre_process_sysu.py", ["--dataset", "folder", "--data_path", "{onergb}"],
     "no IR images under"),
    ("--heldout 1", "pre_process_sysu.py", ["--dataset", "folder", "--data_path", "{onergb}", "--heldout", "1"],
     "--heldout must be in [0, 1)"),
    ("a folder not preprocessed", "train.py", ["--dataset", "folder", "--data_path", "{onergb}"],
     "run: python pre_process_sysu.py --dataset folder"),
    ("fewer folder images than one batch", "train.py", ["--dataset", "folder", "--data_path", "{folder}",
     "--img_h", "48", "--img_w", "24", "--batch-size", "500"], "fewer than one batch"),
    ("several sets, one --data_path", "train.py", ["--dataset", "sysu,folder"], "names 2 sets but --data_path"),
    ("several sets of different image sizes", "train.py", ["--dataset", "sysu,folder", "--data_path",
     "{data},{folder}"], "holds 48x24 images but --img_h/--img_w ask for 96x48"),
    ("a set named twice", "train.py", ["--dataset", "sysu,sysu"], "names a set twice"),
    ("--dataset folder", "AGW/train.py", ["--dataset", "folder", "--data_path", "{folder}"], "need identities"),
    ("several sets", "DDAG/test_ddag.py", ["--dataset", "sysu,llcm", "--resume", "{r18}"], "need identities"),
    ("unknown configuration", "tools/study.py", ["--out", "{tmp}/study", "--configs", "nope"],
     "unknown configuration 'nope'"),
]
# scripts that take the dataset and output flags
_WITH_DATA = ("train.py", "AGW/train.py", "AGW/test.py", "DDAG/train_ddag.py", "DDAG/test_ddag.py")


def command(script, args, files):
    """The full argument list of one case: the case's flags last, so they win."""
    base = []
    if script in _WITH_DATA:
        base = ["--data_path", str(files["data"]), *(SMALL if script == "train.py" else SMALL_ARGS),
                "--model_path", str(files["tmp"] / "sm"), "--log_path", str(files["tmp"] / "log"),
                "--vis_log_path", str(files["tmp"] / "vis"), "--epochs", "1"]
    return base + [a.format(**files) for a in args]


def make_files(data, raw, tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    text, cut, plain, alien, blocker = (tmp / n for n in ("notes.pth", "cut.pth", "plain.t", "alien.t", "file"))
    text.write_text("not a checkpoint\n")
    torch.save({"w": torch.ones(1000)}, plain)
    cut.write_bytes(plain.read_bytes()[:300])
    torch.save({"encoder.weight": torch.zeros(3, 3)}, alien)
    blocker.write_text("x")
    from model import MMGLNet
    r18, r50 = tmp / "mmgl_r18.t", tmp / "mmgl_r50.t"   # pre-training checkpoints, as train.py writes them
    torch.save(MMGLNet("resnet18", "two").state_dict(), r18)
    torch.save(MMGLNet("resnet50", "two").state_dict(), r50)
    # an unlabelled folder preprocessed at 48x24, and one with RGB images only
    from pre_process_sysu import preprocess_folder
    from tools.make_synthetic import make_folder
    folder, onergb = tmp / "crops", tmp / "rgb_only"
    make_folder(folder, num_ids=4, seed=0)
    preprocess_folder(folder, img_h=48, img_w=24, verbose=False)
    (onergb / "rgb").mkdir(parents=True)
    (folder / "rgb" / "day").rename(onergb / "rgb" / "day")
    return {"data": data, "raw": raw, "tmp": tmp, "text": text, "cut": cut, "plain": plain,
            "alien": alien, "blocker": blocker, "r18": r18, "r50": r50, "folder": folder, "onergb": onergb}


@pytest.fixture(scope="module")
def files(sysu_small, tmp_path_factory):
    from tools.make_synthetic import make_sysu
    raw = tmp_path_factory.mktemp("raw") / "SYSU-MM01"
    make_sysu(raw, num_ids=6, seed=1, imgs_per_cam=(1, 1))
    return make_files(sysu_small, raw, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("what,script,args,needle", CASES, ids=[f"{c[1]}: {c[0]}" for c in CASES])
def test_bad_input_is_one_error_line(what, script, args, needle, files):
    cwd = ROOT / script.split("/")[0] if "/" in script and not script.startswith("tools") else ROOT
    res = run_script(ROOT / script, *command(script, args, files), cwd=cwd, check=False)
    assert res.returncode == 2, (what, res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    err = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    # short: at most ~240 characters besides the paths it names
    assert len(err[0].replace(str(files["tmp"]), "T").replace(str(files["data"]), "D")) <= 240, err[0]
    # the error is the only output: no run header, nothing trained, no log of a run that never started
    assert res.stdout.strip() == "", res.stdout[-2000:]
    assert not list((files["tmp"] / "log").rglob("*.txt"))


def test_reliability_table_lists_every_case():
    """docs/RELIABILITY.md's table is this list, printed by running this file as a script:
    one row per case, in order, each with its message (the needle), so it cannot drift."""
    rows = [line for line in (ROOT / "docs" / "RELIABILITY.md").read_text().splitlines()
            if re.match(r"\| \d+ \| `", line)]
    assert len(rows) == len(CASES), "re-run: python tests/test_bad_inputs.py DATA OUT"
    for row, (what, script, _, needle) in zip(rows, CASES):
        assert f"`{script}`: {what} |" in row and needle.replace("|", "\\|") in row, (row, what, needle)


if __name__ == "__main__":   # the docs/RELIABILITY.md table from the real messages
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    from tools.make_synthetic import make_sysu
    raw = out / "raw" / "SYSU-MM01"
    if not raw.exists():
        make_sysu(raw, num_ids=6, seed=1, imgs_per_cam=(1, 1))
    f = make_files(data, raw, out / "bad")
    print("| # | input | message (stderr) | exit |\n|---|---|---|---|")
    for i, (what, script, args, _) in enumerate(CASES, 1):
        cwd = ROOT / script.split("/")[0] if "/" in script and not script.startswith("tools") else ROOT
        r = run_script(ROOT / script, *command(script, args, f), cwd=cwd, check=False)
        msg = r.stderr.strip().splitlines()[-1].replace(str(out), "…").replace(str(data), "DATA").replace("|", "\\|")
        print(f"| {i} | `{script}`: {what} | `{msg}` | {r.returncode} |")
