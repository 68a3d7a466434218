"""The bad inputs of docs/RELIABILITY.md's table: each ends in ONE line 'error: ...' on
stderr (at most ~200 characters), exit status 2, no traceback. Run as a script
(``python tests/test_bad_inputs.py DATA_DIR``) it prints the table's Markdown rows from
the real messages."""
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import SMALL_ARGS, load_script, run_script

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
    # never lose a run: outputs of a run of the same name, a run writing them now, an empty --resume
    ("the same run again (its outputs exist)", "train.py", ["--model_path", "{done}"], "has outputs already"),
    ("the same run again (its outputs exist)", "AGW/train.py", ["--model_path", "{done}"], "has outputs already"),
    ("a run of the same name writing now", "train.py", ["--model_path", "{locked}"], "is writing the outputs of"),
    ("--resume given empty (an unset variable)", "train.py", ["--resume", ""], "--resume was given an empty value"),
    ("--resume given empty (an unset variable)", "AGW/train.py", ["--resume", ""], "--resume was given an empty"),
    ("--data_path given empty", "DDAG/train_ddag.py", ["--data_path", ""], "--data_path was given an empty"),
    ("several sets, an empty --data_path entry", "train.py", ["--dataset", "folder,sysu", "--data_path", "{folder},"],
     "has an empty entry"),
    # a resume that is not the run it continues
    ("--stream one resuming a two-stream _last.pth", "train.py", ["--resume", "{last}", "--stream", "one"],
     "has other flags (--stream two -> one)"),
    ("--arch resnet50 resuming a resnet18 _last.pth", "train.py", ["--resume", "{last}", "--arch", "resnet50"],
     "(--arch resnet18 -> resnet50); a run continues only"),
    ("--optim adam resuming an sgd _last.pth", "train.py", ["--resume", "{last}", "--optim", "adam"],
     "(--optim sgd -> adam); a run continues only"),
    ("--num_stripe 3 resuming a K=6 _last.pth", "train.py", ["--resume", "{last}", "--num_stripe", "3"],
     "(--num_stripe 6 -> 3)"),
    ("resuming with another --batch-size", "train.py", ["--resume", "{last}", "--batch-size", "8"],
     "not an exact resume; add --resume_anyway"),
    ("resuming on another dataset", "train.py", ["--resume", "{last}", "--dataset", "folder", "--data_path",
     "{folder}", "--img_h", "48", "--img_w", "24"], "not an exact resume"),
    ("--optim adam resuming an sgd _last.pth", "AGW/train.py", ["--resume", "{agwlast}", "--optim", "adam"],
     "(--optim sgd -> adam); a run continues only"),
    ("resuming with another --seed", "AGW/train.py", ["--resume", "{agwlast}", "--seed", "3"],
     "(--seed 0 -> 3): not an exact resume"),
    ("--batch-size larger than the identities", "AGW/train.py", ["--batch-size", "40"],
     "but only 28 identities have both RGB and IR images"),
    ("--batch-size larger than the images", "train.py", ["--batch-size", "5000"], "fewer than one batch"),
    # malformed label arrays, refused where they are read
    ("a 0-d label array", "train.py", ["--data_path", "{lab0d}"], "expected a 1-D array of integers, got shape ()"),
    ("a 2-D label array", "AGW/train.py", ["--data_path", "{lab2d}"], "expected a 1-D array of integers"),
    ("NaN labels", "train.py", ["--data_path", "{labnan}"], "are not whole numbers (e.g. nan)"),
    ("fractional labels", "DDAG/train_ddag.py", ["--data_path", "{labfrac}"], "are not whole numbers (e.g. 1.5)"),
    ("negative labels", "AGW/train.py", ["--data_path", "{labneg}"], "labels are negative (e.g. -1)"),
    ("text labels", "DDAG/train_ddag.py", ["--data_path", "{labtext}"], "expected integers, got <U"),
    ("--report with nothing run", "tools/study.py", ["--out", "{tmp}/nothing", "--report"], "no pre-training run"),
    ("--jobs 0", "tools/study.py", ["--out", "{tmp}/study0", "--jobs", "0"], "--jobs must be >= 1"),
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
    files = {"data": data, "raw": raw, "tmp": tmp, "text": text, "cut": cut, "plain": plain,
             "alien": alien, "blocker": blocker, "r18": r18, "r50": r50, "folder": folder, "onergb": onergb}
    files.update(bad_label_sets(data, tmp))
    files.update(earlier_runs(files))
    return files


def bad_label_sets(data, tmp):
    """Copies of the preprocessed set (images linked) whose RGB label array is malformed."""
    import numpy as np
    n = len(np.load(data / "train_rgb_resized_label.npy"))
    bad = {"lab0d": np.array(3), "lab2d": np.zeros((2, n), np.int64), "labnan": np.full(n, np.nan),
           "labfrac": np.full(n, 1.5), "labneg": np.concatenate([[-1], np.arange(n - 1) % 20]),
           "labtext": np.array(["a"] * n)}
    out = {}
    for key, labels in bad.items():
        d = tmp / key / "SYSU-MM01"
        d.mkdir(parents=True)
        for f in data.iterdir():
            (d / f.name).symlink_to(f)
        (d / "train_rgb_resized_label.npy").unlink()
        np.save(d / "train_rgb_resized_label.npy", labels)
        out[key] = d
    return out


def earlier_runs(files):
    """A pre-training and an AGW ``<run>_last.pth`` as the base commands would write them
    (``{last}``, ``{agwlast}``, in the model folder ``{done}``), and a model folder whose
    run lock another process holds (``{locked}``: this one, for the module's lifetime)."""
    import fcntl
    import checkpoint
    import cli
    import engine_finetune
    from model import MMGLNet
    train, agw_train = load_script("train.py"), load_script("AGW/train.py")
    done, locked = files["tmp"] / "done", files["tmp"] / "locked"
    done.mkdir()
    locked.mkdir()
    args = train.check_args(train.get_args_parser().parse_args(command("train.py", [], files)))
    args.data_path = str(Path(args.data_path).resolve())
    name = train.run_name(args)
    net = MMGLNet(args.arch, args.stream, num_stripe=args.num_stripe)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    last = done / f"{name}_last.pth"
    checkpoint.save_last(last, "pretrain", net, opt, torch.amp.GradScaler("cpu", enabled=False), 0, args,
                         state={"scheduler": {}, "global_step": 1, "pcc_from": None})
    fargs = engine_finetune.prepare_args(agw_train.get_parser().parse_args(command("AGW/train.py", [], files)),
                                         ROOT / "AGW")
    agw = agw_train.builder(fargs)(28)
    cli._PENDING_WARNINGS.clear()   # the base commands' warm-up notes: not this process's to print
    agwlast = done / f"{engine_finetune.run_name(fargs, fargs.method)}_last.pth"
    checkpoint.save_last(agwlast, "finetune", agw, engine_finetune.build_optimizer(agw, fargs, agw.new_modules()),
                         torch.amp.GradScaler("cpu", enabled=False), 0, fargs, state={"global_step": 1})
    lock = open(locked / f".{name}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("12345")
    lock.flush()
    return {"last": last, "agwlast": agwlast, "done": done, "locked": locked, "_lock": lock}


@pytest.fixture(scope="module")
def files(sysu_small, tmp_path_factory):
    from tools.make_synthetic import make_sysu
    raw = tmp_path_factory.mktemp("raw") / "SYSU-MM01"
    make_sysu(raw, num_ids=6, seed=1, imgs_per_cam=(1, 1))
    return make_files(sysu_small, raw, tmp_path_factory.mktemp("bad"))


# the cases run in two files (this one and test_bad_inputs_2.py), so that the suite's two
# workers share them: each case is a fresh interpreter
FIRST_HALF, SECOND_HALF = CASES[:len(CASES) // 2], CASES[len(CASES) // 2:]


def case_ids(cases):
    return [f"{c[1]}: {c[0]}" for c in cases]


@pytest.mark.parametrize("what,script,args,needle", FIRST_HALF, ids=case_ids(FIRST_HALF))
def test_bad_input_is_one_error_line(what, script, args, needle, files):
    check_case(what, script, args, needle, files)


def check_case(what, script, args, needle, files):
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


def test_a_failed_study_step_says_why(tmp_path):
    """A run the study starts fails: its one-line reason reaches the terminal, not only its log."""
    res = run_script(ROOT / "tools" / "study.py", "--out", tmp_path / "s", "--num_ids", "2", check=False)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert "make_synthetic.py failed (exit 2): --num_ids must be at least 5" in err[0] and "data.log" in err[0]


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
    for i, (what, name, args, _) in enumerate(CASES, 1):
        cwd = ROOT / name.split("/")[0] if "/" in name and not name.startswith("tools") else ROOT
        r = run_script(ROOT / name, *command(name, args, f), cwd=cwd, check=False)
        msg = r.stderr.strip().splitlines()[-1].replace(str(out), "…").replace(str(data), "DATA").replace("|", "\\|")
        print(f"| {i} | `{name}`: {what} | `{msg}` | {r.returncode} |")
