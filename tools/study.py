"""Does the pre-training learn, and does it help? The small-scale study, end to end, on
synthetic data, in one command:

    python tools/study.py --out study/ --num_ids 60 --epochs 30 --jobs 2

1. a synthetic SYSU-MM01 (``tools/make_synthetic.py``), preprocessed at 96x48;
2. MMGL pre-training (ResNet-18) in five configurations, each logging the held-out
   permutation accuracy after every epoch: the paper's GAP head K=6 with the default PCC,
   GAP K=6 without PCC, the stripes head K=6 with and without PCC, GAP K=6 with the PCC of
   the authors' figure (--pcc_reading figure);
3. AGW fine-tuning from the pre-trained checkpoint with the highest held-out permutation
   accuracy vs from random weights, same budget, ``--seeds`` seeds each;
4. DDAG (``--wpa --graph``) the same, ``--ddag_seeds`` seeds each, and its ``--ddag_variants``;
5. ``OUT/results.md`` (the tables) and ``OUT/*.png`` (the curves).

Every run lives in its own folder under OUT and is skipped once its JSON lines show it
finished; an interrupted run continues from its ``_last.pth``. So the command can be
stopped and re-run at any time. Runs go ``--jobs`` at a time, ``--threads`` CPU threads
each (``--gpu 0``: on CUDA device 0).
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F

matplotlib.use("Agg")   # files only, no display; before pyplot
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import logger  # noqa: E402
import model  # noqa: E402
from cli import REPO_ROOT, ArgumentParser, UserError, cli  # noqa: E402
from loss import TripletLoss, TripletLoss_WRT, pdist  # noqa: E402
from data_loader import DeviceAugment, IdentitySampler, PreprocessedData, make_loader  # noqa: E402

# name -> (train.py flags, label in tables and plots)
# Every PCC reading spelled out, so a configuration means the same run whatever the
# defaults (train.PCC_READINGS): FIRST is our first reading (the default until 2 December
# 2026), PART_MUTUAL the same-part mutual positives (the default since), NOW PCC from the
# first epoch (no switch-on), FIGURE the figure's pair at the per-matrix balance.
FIRST = ["--pcc_reading", "first"]   # pair, all, shuffled, on from the first epoch, mean MSE
PART_MUTUAL = ["--pcc_reading", "mutual"]   # mutual, part, original, on at 2x chance, mean MSE
FIGURE = ["--pcc_reading", "figure"]   # pair, all, shuffled, on from the first epoch, MSE per matrix / K*K
NOW = ["--pcc_start_acc", "0"]
S = ["--perm_feat", "stripes"]
LLCM_DATA = "<llcm>"   # replaced by the study's synthetic LLCM (another seed: other people)
STEPS = "<steps>"      # replaced by --steps_per_epoch
# name -> (train.py flags, label in tables and plots)
PRETRAIN = {
    # the figure's PCC at the per-matrix balance (--pcc_reading figure)
    "gap_k6_figure": (FIGURE, "GAP, K=6, the figure's PCC (pair, MSE per matrix / K*K)"),
    "stripes_k6_figure": (S + FIGURE, "stripes head, K=6, the figure's PCC"),
    "gap_k3_figure": (FIGURE + ["--num_stripe", "3"], "GAP, K=3, the figure's PCC"),
    "gap_k6_pcc": (FIRST, "GAP, K=6, PCC first reading (the paper's configuration)"),
    "gap_k6_nopcc": (["--no-pcc"], "GAP, K=6, no PCC"),
    "stripes_k6_pcc": (S + FIRST, "stripes head, K=6, PCC first reading"),
    "stripes_k6_nopcc": (S + ["--no-pcc"], "stripes head, K=6, no PCC"),
    "gap_k3_pcc": (FIRST + ["--num_stripe", "3"], "GAP, K=3, PCC first reading"),
    # the first screen of loss-balance readings (GAP, K=6, PCC on at the paper's weight)
    "gap_k6_pcc_cw0.05": (FIRST + ["--cl_weight", "0.05"], "GAP, K=6, PCC at weight 0.05 (diagnostic)"),
    "gap_k6_pcc_cw0": (FIRST + ["--cl_weight", "0"], "GAP, K=6, PCC branch built, weight 0 (control)"),
    "gap_k6_pcc_cycle": (FIRST + ["--pcc_form", "cycle"], "GAP, K=6, PCC cycle form"),
    "gap_k6_pcc_part_orig": (FIRST + ["--pcc_pool", "part", "--pcc_order", "original"],
                             "GAP, K=6, PCC within body part"),
    "gap_k6_pcc_cycle_part_orig": (FIRST + ["--pcc_form", "cycle", "--pcc_pool", "part", "--pcc_order", "original"],
                                   "GAP, K=6, PCC cycle form within body part"),
    "gap_k6_pcc_detach": (FIRST + ["--pcc_detach_pool"], "GAP, K=6, PCC with constant neighbour pools"),
    "gap_k6_pcc_permbn": (FIRST + ["--perm_bn"], "GAP + BN, K=6, PCC"),
    "gap_k6_pcc_mse_matrix": (FIRST + ["--perm_reduction", "matrix"], "GAP, K=6, PCC, MSE summed per matrix"),
    # the paper's head with the readings the stripes screen found
    "gap_k6_mutual_part_orig": (PART_MUTUAL + NOW, "GAP, K=6, PCC same-part mutual-NN positives"),
    "gap_k6_mutual_part_orig_start10": (PART_MUTUAL + NOW + ["--pcc_start_epoch", "10"],
                                        "GAP, K=6, PCC same-part mutual-NN positives, on at epoch 10"),
    "gap_k6_mutual_part_orig_startacc2": (PART_MUTUAL + ["--pcc_start_acc", "2"],
                                          "GAP, K=6, PCC same-part mutual-NN positives, on at stripe acc 2x "
                                          "chance (the default)"),
    # the screen of PCC readings on the fast diagnostic (stripes head, K=6, PCC at 0.5)
    "stripes_k6_cw0": (S + FIRST + ["--cl_weight", "0"], "stripes, PCC branch built, weight 0 (control)"),
    "stripes_k6_mlp": (S + FIRST + ["--pcc_head", "mlp"], "stripes, PCC through an MLP head"),
    "stripes_k6_mutual": (S + FIRST + ["--pcc_form", "mutual"], "stripes, PCC mutual-NN real-stripe positives"),
    "stripes_k6_mutual_part_orig": (S + PART_MUTUAL + NOW, "stripes, PCC mutual-NN positives of the same body part"),
    "stripes_k6_part_orig": (S + FIRST + ["--pcc_pool", "part", "--pcc_order", "original"],
                             "stripes, PCC within body part"),
    "stripes_k6_part_orig_mlp": (S + FIRST + ["--pcc_pool", "part", "--pcc_order", "original", "--pcc_head", "mlp"],
                                 "stripes, PCC within body part, MLP head"),
    "stripes_k6_separate": (S + FIRST + ["--local_branch", "separate"], "stripes, PCC on its own copy of layer4"),
    "stripes_k6_mse_matrix": (S + FIRST + ["--perm_reduction", "matrix"],
                              "stripes, PCC, permutation MSE summed per matrix"),
    "stripes_k6_mutual_part_orig_mse_matrix": (S + PART_MUTUAL + NOW + ["--perm_reduction", "matrix"],
                                               "stripes, PCC mutual-NN same-part positives, MSE summed per matrix"),
    "stripes_k6_start10": (S + FIRST + ["--pcc_start_epoch", "10"], "stripes, PCC switched on at epoch 10"),
    "stripes_k6_ramp10": (S + FIRST + ["--pcc_ramp_epochs", "10"],
                          "stripes, PCC weight ramped 0 -> 0.5 over 10 epochs"),
    # the paper's backbone (run with --arch resnet50): the default spelled out, one-stream beside it
    # BatchNorm on the pooled feature before the head (--perm_bn): ResNet-50's head died
    # without it (docs/STUDY.md); the reference and the default, each with it
    "gap_k6_nopcc_permbn": (["--no-pcc", "--perm_bn"], "GAP, K=6, no PCC, BatchNorm before the head"),
    "gap_k6_default_permbn": (PART_MUTUAL + ["--pcc_start_acc", "2", "--perm_bn"],
                              "GAP, K=6, the default with BatchNorm before the head"),
    # PCC's weight scaled by the measured gradient ratio: PCC's gradient on layer4 is 12x the
    # permutation loss's on ResNet-50 against 2x for the ResNet-18 default that learns
    # (medians over epochs), so 0.5 x 2/12 ~ 0.1 gives ResNet-50 ResNet-18's balance
    "gap_k6_default_permbn_cw0.1": (PART_MUTUAL + ["--pcc_start_acc", "2", "--perm_bn", "--cl_weight", "0.1"],
                                    "GAP, K=6, the default with BatchNorm before the head, "
                                    "PCC weight 0.1"),
    "gap_k6_default_one": (PART_MUTUAL + ["--pcc_start_acc", "2", "--stream", "one"],
                           "GAP, K=6, default PCC, one-stream"),
    "gap_k6_default_one_permbn": (PART_MUTUAL + ["--pcc_start_acc", "2", "--stream", "one", "--perm_bn"],
                                  "GAP, K=6, default PCC, one-stream, BatchNorm before the head"),
    "gap_k6_default_one_permbn_cw0.1": (PART_MUTUAL + ["--pcc_start_acc", "2", "--stream", "one", "--perm_bn",
                                                       "--cl_weight", "0.1"],
                                        "GAP, K=6, default PCC, one-stream, BatchNorm before "
                                        "the head, PCC weight 0.1"),
    # the figure's own PCC (q_i with its soft neighbours from both modalities) on the paper's head,
    # the permutation MSE summed per K x K matrix (gap_k6_pcc_mse_matrix without BatchNorm:
    # that kills the plain head's units), with BatchNorm before the head; seeds 0 and 1
    "gap_k6_pair_matrix_permbn": (FIRST + ["--perm_reduction", "matrix", "--perm_bn"],
                                  "GAP, K=6, the figure's PCC, MSE per matrix, BatchNorm before the head"),
    "gap_k6_pair_matrix_permbn_seed1": (FIRST + ["--perm_reduction", "matrix", "--perm_bn", "--seed", "1"],
                                        "GAP, K=6, the figure's PCC, MSE per matrix, BatchNorm before the head, seed 1"),
    # the same balance of the two gradients on the backbone without the larger step: the MSE
    # summed per matrix is 36 x the mean, so it multiplies every step of the head by 36; PCC's
    # weight divided by 36 (0.5 / 36) instead keeps the mean's step and the plain head; seeds 0, 1
    "gap_k6_pair_balanced": (FIRST + ["--cl_weight", "0.0139"],
                             "GAP, K=6, the figure's PCC at weight 0.5/36 (the per-matrix balance)"),
    "gap_k6_pair_balanced_seed1": (FIRST + ["--cl_weight", "0.0139", "--seed", "1"],
                                   "GAP, K=6, the figure's PCC at weight 0.5/36 (the per-matrix balance), seed 1"),
    # ... as the reading --pcc_reading figure (the weight is 0.5 / K*K exactly), on ResNet-50
    # with BatchNorm before the head
    "gap_k6_figure_permbn": (FIGURE + ["--perm_bn"], "GAP, K=6, the figure's PCC, BatchNorm before "
                             "the head"),
    "stripes_k6_default": (S + PART_MUTUAL, "stripes, PCC same-part mutual-NN, on at stripe acc 2x chance "
                           "(the default)"),
    # the paper's transfer and data-efficiency claims: the default configuration on other
    # data, each for the SAME steps (--steps_per_epoch) as the default on the study's SYSU-MM01
    "gap_k6_default_sysu": (PART_MUTUAL + ["--iters_per_epoch", STEPS],
                            "GAP, K=6, default PCC, pre-trained on SYSU-MM01"),
    "gap_k6_default_llcm": (PART_MUTUAL + ["--dataset", "llcm", "--data_path", LLCM_DATA, "--iters_per_epoch", STEPS],
                            "GAP, K=6, default PCC, pre-trained on LLCM only (transfer)"),
    "gap_k6_default_ratio0.05": (PART_MUTUAL + ["--train_ratio", "0.05", "--iters_per_epoch", STEPS],
                                 "GAP, K=6, default PCC, pre-trained on 5% of the SYSU-MM01 images"),
}
DEFAULT_CONFIGS = "gap_k6_mutual_part_orig_startacc2,gap_k6_nopcc,stripes_k6_default,stripes_k6_nopcc,gap_k6_figure"
READINGS = ("gap_k6_pcc,gap_k6_nopcc,gap_k6_pcc_cw0,gap_k6_pcc_cw0.05,gap_k6_pcc_cycle,gap_k6_pcc_part_orig,"
            "gap_k6_pcc_detach,gap_k6_pcc_mse_matrix")
SCREEN = ("stripes_k6_nopcc,stripes_k6_cw0,stripes_k6_pcc,stripes_k6_mlp,stripes_k6_mutual,stripes_k6_part_orig,"
          "stripes_k6_part_orig_mlp,stripes_k6_separate,stripes_k6_start10,stripes_k6_ramp10,"
          "stripes_k6_mutual_part_orig,stripes_k6_default,stripes_k6_mse_matrix,stripes_k6_mutual_part_orig_mse_matrix,"
          "gap_k6_mutual_part_orig_start10")

def size(args):
    """The study's image size and backbone: 96x48 ResNet-18 unless --img_h/--img_w/--arch say."""
    return ["--img_h", str(args.img_h), "--img_w", str(args.img_w), "--arch", args.arch]


def get_args_parser():
    p = ArgumentParser("study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="study", help="output folder (relative: to the repository)")
    p.add_argument("--num_ids", default=60, type=int, help="identities of the synthetic set (60: 42 "
                   "training and 18 test ids)")
    p.add_argument("--data_seed", default=0, type=int)
    p.add_argument("--arch", default="resnet18", help="backbone of every run (resnet18 | resnet50)")
    p.add_argument("--img_h", default=96, type=int, help="image height of the preprocessed set and every run")
    p.add_argument("--img_w", default=48, type=int, help="image width")
    p.add_argument("--epochs", default=30, type=int, help="pre-training epochs of every configuration")
    p.add_argument("--batch-size", dest="batch_size", default=16, type=int,
                   help="pre-training images per modality per step")
    p.add_argument("--steps_per_epoch", default=40, type=int, help="pre-training steps per epoch of the "
                   "transfer and data-efficiency configurations (40: one pass over the default 60-id set)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="pre-training configurations to run, or "
                   "'readings' for the first screen of loss-balance readings, 'screen' for the screen of PCC "
                   "readings on the stripes head (known: " + ", ".join(PRETRAIN) + ")")
    p.add_argument("--ft_epochs", default=10, type=int, help="AGW/DDAG fine-tuning epochs")
    p.add_argument("--seeds", default=3, type=int, help="AGW seeds per initialisation")
    p.add_argument("--ddag_seeds", default=1, type=int, help="DDAG seeds per initialisation (0: skip)")
    p.add_argument("--ddag_variants", default="", help="comma-separated DDAG variants also fine-tuned, "
                   "--ddag_seeds seeds each: plain (without --wpa --graph), warm (2 warm-up epochs), long "
                   "(2 x --ft_epochs)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and plots from the JSON "
                   "lines already under --out; start no run (unfinished runs are reported as far as they got)")
    p.add_argument("--ft_from", default="", help="fine-tune from this configuration's checkpoint (default: "
                   "the finished K=6 run with the highest held-out permutation accuracy)")
    p.add_argument("--ft_also", default="", help="comma-separated configurations whose checkpoints AGW is "
                   "also fine-tuned from (--seeds seeds each; the transfer and data-efficiency table)")
    p.add_argument("--jobs", default=2, type=int, help="runs at once")
    p.add_argument("--threads", default=1, type=int, help="CPU threads per run")
    p.add_argument("--gpu", default="cpu")
    return p


# ----------------------------------------------------------------------------- running
def run_log(d):
    """The JSON lines of the run in folder ``d`` in the flat schema (logger.read_jsonl; our
    older files upgraded), in epoch order; [] for one not started. A run continued from a
    ``_last.pth`` of an older name writes its later epochs under the new name: every file of
    the folder counts, the latest-written line of an epoch wins."""
    lines = {}
    for f in sorted(Path(d).glob("log/*.jsonl"), key=lambda f: f.stat().st_mtime):
        lines.update((r["epoch"], r) for r in logger.read_jsonl(f))
    return [lines[e] for e in sorted(lines)]


def last_state(d):
    """The newest ``_last.pth`` in folder ``d`` (the one a continuation wrote), or None."""
    return max(Path(d).glob("*_last.pth"), key=lambda f: f.stat().st_mtime, default=None)


def run(cmd, log, args, cwd=REPO_ROOT):
    """One run, its output in ``log``; UserError naming the log if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL).returncode
    if rc:
        # the run's own one-line reason (cli.cli prints 'error: ...' last), else where to look
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("error: ")), "")
        raise UserError(f"{Path(cmd[1]).name} failed (exit {rc})" + (f": {reason[7:]}" if reason else "")
                        + f"; see {log}")
    print(f"  done in {time.time() - t0:.0f}s: {log}", flush=True)


def submit(pool, jobs, args):
    """``jobs``: [(cmd, log, cwd)] into the pool (``--jobs`` at a time) -> futures."""
    return [pool.submit(run, cmd, log, args, cwd) for cmd, log, cwd in jobs]


def wait(futures):
    for f in futures:   # the first failure stops the study
        f.result()


# the study's synthetic sets: folder, generator seed offset (LLCM: another seed, other people)
SYNTHETIC = {"sysu": ("SYSU-MM01", 0), "llcm": ("LLCM", 1)}


def prepare_data(out, args, dataset="sysu"):
    """The study's synthetic set (--num_ids identities; LLCM, for the transfer rows, as many
    as SYSU-MM01 from another seed), preprocessed at the study's size, made once."""
    folder, seed = SYNTHETIC[dataset]
    data = out / "data" / folder
    if (data / "train_ir_resized_img.npy").is_file():
        return data
    out.mkdir(parents=True, exist_ok=True)
    print(f"==> synthetic {folder}, {args.num_ids} ids -> {data}", flush=True)
    py = sys.executable
    run([py, "tools/make_synthetic.py", "--dataset", dataset, "--out", str(data), "--num_ids",
         str(args.num_ids), "--seed", str(args.data_seed + seed)], out / "data.log", args)
    run([py, "pre_process_sysu.py", "--dataset", dataset, "--data_path", str(data), *size(args)[:4], "--workers",
         str(args.jobs)], out / "data.log", args)
    return data


def pretrain_jobs(out, data, args, names):
    jobs = []
    for name in names:
        flags, _ = PRETRAIN[name]
        d = out / "pretrain" / name
        if len(run_log(d)) >= args.epochs:
            continue
        if LLCM_DATA in flags:
            flags = [str(prepare_data(out, args, "llcm")) if f == LLCM_DATA else f for f in flags]
        flags = [str(args.steps_per_epoch) if f == STEPS else f for f in flags]
        cmd = [sys.executable, "train.py", "--dataset", "sysu", "--data_path", str(data), *size(args),
               "--batch-size", str(args.batch_size), "--lr", "0.1",
               "--warmup_epochs", "1", "--epochs", str(args.epochs), "--save_epoch", str(args.epochs),
               "--print_freq", "1000", "--workers", "0", "--gpu", args.gpu,
               "--model_path", str(d), "--log_path", str(d / "log"), "--vis_log_path", str(d / "vis"),
               *flags]
        last = last_state(d)
        if last:
            cmd += ["--resume", str(last)]
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((cmd, d / "run.log", REPO_ROOT))
    return jobs


def pretrain_results(out, args):
    """{configuration: its JSON lines and checkpoint} for --configs and the --ft_from one."""
    res = {}
    for name in dict.fromkeys(args.configs.split(",") + ([args.ft_from] if args.ft_from else [])):
        d = out / "pretrain" / name
        log = run_log(d)
        if log:
            res[name] = {"log": log, "ckpt": next(iter(d.glob("*_epoch_*.t")), None)}
    return res


# the fine-tuning runs: method -> (its folder and script, the flags added to the study's
# protocol, the test feature its tables report, epochs as a multiple of --ft_epochs).
# ddag_*: the variants that ask why DDAG does not gain (--ddag_variants)
FINETUNE = {
    "agw": ("AGW", "train.py", [], "FC", 1),
    "ddag": ("DDAG", "train_ddag.py", ["--wpa", "--graph"], "FC_att", 1),
    "ddag_plain": ("DDAG", "train_ddag.py", [], "FC", 1),                               # no part attention, no graph
    "ddag_warm": ("DDAG", "train_ddag.py", ["--wpa", "--graph", "--warmup_epochs", "2"], "FC_att", 1),
    "ddag_long": ("DDAG", "train_ddag.py", ["--wpa", "--graph"], "FC_att", 2),        # twice the epochs
}
TESTED = {method: spec[3] for method, spec in FINETUNE.items()}


def ft_epochs(method, args):
    return FINETUNE[method][4] * args.ft_epochs


def finetune_jobs(out, data, inits, args):
    """``inits``: {folder prefix: checkpoint, or None for random weights}. AGW ``--seeds``
    seeds, DDAG and each of its ``--ddag_variants`` ``--ddag_seeds`` seeds of each; the
    ``from_*`` sources (``--ft_also``) AGW only."""
    jobs = []
    methods = [("agw", args.seeds), ("ddag", args.ddag_seeds)]
    methods += [(f"ddag_{v}", args.ddag_seeds) for v in args.ddag_variants.split(",") if v]
    for method, seeds in methods:
        folder, script, flags, _, _ = FINETUNE[method]
        epochs = ft_epochs(method, args)
        for seed in range(seeds):
            for init, ckpt in inits.items():
                if method != "agw" and init.startswith("from_"):
                    continue
                d = out / method / f"{init}_seed{seed}"
                if len(run_log(d)) >= epochs:
                    continue
                # the study's protocol: lr 0.1 without warm-up, tested every 2 epochs (a variant's
                # flags come after, so they win)
                cmd = [sys.executable, script, "--dataset", "sysu", "--data_path", str(data), *size(args),
                       "--lr", "0.1", "--epochs", str(epochs),
                       "--warmup_epochs", "0", "--test_every", "2", "--print_freq", "1000",
                       "--workers", "0", "--gpu", args.gpu, "--seed", str(seed),
                       "--model_path", str(d), "--log_path", str(d / "log"), "--vis_log_path", str(d / "vis"),
                       *flags]
                last = last_state(d)
                if last:
                    cmd += ["--resume", str(last)]
                elif init != "random":
                    if not ckpt:   # a finished pre-training whose checkpoint was not kept
                        raise UserError(f"{d}: nothing to fine-tune from (no pre-training checkpoint under "
                                        f"{out / 'pretrain'} for {init})")
                    cmd += ["--resume", str(ckpt)]
                d.mkdir(parents=True, exist_ok=True)
                jobs.append((cmd, d / "run.log", REPO_ROOT / folder))
    return jobs


# ----------------------------------------------------------------------------- feature scale
def feature_scale(ckpts, data, batches=4, arch="resnet18"):
    """The first AGW step from each of ``ckpts`` ({name: path}) and from random weights,
    without training: mean over
    ``batches`` identity batches (8 ids x 4 RGB + 4 IR, train-time augmentation, BN in train
    mode as at step 0) of the pooled features' norm, their pairwise distances (same id across
    modalities, different ids), and the triplet losses on them: the authors' WRT, WRT with
    stable weights, batch-hard with margin 0.3. -> {name: {...}, ..., 'random': {...}}."""
    spec = importlib.util.spec_from_file_location("model_agw", REPO_ROOT / "AGW" / "model_agw.py")
    agw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agw)
    train = PreprocessedData(data)
    aug = DeviceAugment(*train.img_size)
    losses = {"WRT (authors)": TripletLoss_WRT(), "WRT (stable)": TripletLoss_WRT(stable=True),
              "batch-hard": TripletLoss(0.3)}
    res = {}
    for init in [*ckpts, "random"]:
        torch.manual_seed(0)
        net = agw.AGWNet(train.num_classes, arch=arch)
        if init != "random":
            model.load_backbone(net, checkpoint.network_state(checkpoint.load(ckpts[init])), log=lambda *_: None,
                                source=str(ckpts[init]))
        net.train()
        rows = []
        loader = make_loader(train, IdentitySampler(train.rgb_label, train.ir_label, 4, 8, seed=0))
        torch.manual_seed(0)
        with torch.no_grad():
            for _, (rgb, ir, yr, yi) in zip(range(batches), loader):
                feat, logits = net(aug(rgb), aug(ir))
                y = torch.cat((yr, yi))
                d = pdist(feat, feat)
                same = y[:, None] == y[None, :]
                n = len(yr)
                cross = torch.zeros_like(same)
                cross[:n, n:] = cross[n:, :n] = True
                row = {"feature norm": feat.norm(dim=1).mean().item(),
                       "distance, same id across modalities": d[same & cross].mean().item(),
                       "distance, different ids": d[~same].mean().item(),
                       "ID loss": F.cross_entropy(logits, y).item()}
                row.update({k: fn(feat, y)[0].item() for k, fn in losses.items()})
                rows.append(row)
        res[init] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return res


# ----------------------------------------------------------------------------- reporting
def _mean_std(xs):
    xs = np.asarray(xs, dtype=float)
    return f"{100 * xs.mean():.1f} ± {100 * xs.std(ddof=1) if len(xs) > 1 else 0:.1f}"


def finetune_logs(out, method, init):
    """{seed: JSON lines} of one method's runs from one initialisation."""
    logs = {int(d.name.rsplit("seed", 1)[1]): run_log(d) for d in sorted((out / method).glob(f"{init}_seed*"))}
    return {seed: log for seed, log in logs.items() if log}


def finetune_table(out, method, feature):
    """Markdown rows for one method: MMGL vs random init over the seeds' final tests."""
    rows = []
    for init in ("mmgl", "random"):
        logs = list(finetune_logs(out, method, init).values())
        tested = f"test/{feature}/rank1"
        finals = [[r for r in log if tested in r][-1] for log in logs if any(tested in r for r in log)]
        if not finals:
            continue
        first = [log[0] for log in logs]
        r1 = [f[tested] for f in finals]
        mAP = [f[f"test/{feature}/mAP"] for f in finals]
        per_seed = ", ".join(f"{100 * x:.1f}" for x in r1)
        tri = sum(f["train/step0_tri_loss"] for f in first) / len(first)
        idl = sum(f["train/step0_id_loss"] for f in first) / len(first)
        norm = sum(f["train/step0_feat_norm"] for f in first) / len(first)
        dist = sum(f["train/step0_feat_dist"] for f in first) / len(first)
        rows.append(f"| {method.upper()} | {init} | {len(finals)} | {_mean_std(r1)} ({per_seed}) | "
                    f"{_mean_std(mAP)} | {idl:.2f} | {tri:.2f} | {norm:.1f} / {dist:.1f} |")
    return rows


def finetune_finals(out, method, feature, inits=("mmgl", "random")):
    """{init: {seed: final test entry}} of one method's runs."""
    res = {}
    for init in inits:
        for seed, log in finetune_logs(out, method, init).items():
            tested = [r for r in log if f"test/{feature}/rank1" in r]
            if tested:
                res.setdefault(init, {})[seed] = {
                    m: tested[-1][f"test/{feature}/{m}"] for m in ("rank1", "rank5", "mAP", "mINP")}
    return res


# the training curves that say how a fine-tuning run got where it ended: (JSON key, title, scale)
DYNAMICS = (("train/id_loss", "ID loss", 1), ("train/tri_loss", "triplet loss", 1),
            ("train/acc", "training accuracy (%)", 100), ("train/feat_norm", "pooled feature norm", 1),
            ("train/wG", "DDAG graph weight wG", 1))


def dynamics_rows(out, method):
    """Markdown rows for one method: the first and last epochs' training means, averaged over
    the seeds of each initialisation (a row per init; '–' where the method does not log it)."""
    rows = []
    for init in ("mmgl", "random"):
        logs = list(finetune_logs(out, method, init).values())
        if not logs:
            continue
        cells = []
        for key, _, scale in DYNAMICS:
            first = [scale * log[0][key] for log in logs if key in log[0]]
            last = [scale * log[-1][key] for log in logs if key in log[-1]]
            cells.append(f"{np.mean(first):.2f} -> {np.mean(last):.2f}" if first and last else "–")
        rows.append(f"| {method.upper()} | {init} | {len(logs)} | {len(logs[0])} | " + " | ".join(cells) + " |")
    return rows


def _panel(ax, title, xlabel, **title_style):
    ax.set_title(title, **title_style)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_finetune(out, tested):
    """finetune_curves.png: per method (a row each), the DYNAMICS and the test Rank-1 of the
    ``tested`` feature over epochs; every seed a thin line, the mean over seeds a thick one."""
    methods = [m for m in tested if finetune_logs(out, m, "mmgl") or finetune_logs(out, m, "random")]
    if not methods:
        return
    keys = [*DYNAMICS, ("test/{}/rank1", "test Rank-1 (%)", 100)]
    fig, axes = plt.subplots(len(methods), len(keys), figsize=(4 * len(keys), 3.2 * len(methods)), squeeze=False)
    for row, method in zip(axes, methods):
        for color, init in (("C0", "mmgl"), ("C1", "random")):
            logs = list(finetune_logs(out, method, init).values())
            for ax, (key, _, scale) in zip(row, keys):
                key = key.format(tested[method])
                curves = [[(r["epoch"] + 1, scale * r[key]) for r in log if key in r] for log in logs]
                curves = [c for c in curves if c]
                for c in curves:
                    ax.plot(*zip(*c), color=color, lw=0.6, alpha=0.5)
                if curves and all(len(c) == len(curves[0]) for c in curves):
                    x = [e for e, _ in curves[0]]
                    ax.plot(x, np.mean([[v for _, v in c] for c in curves], axis=0), color=color, lw=2,
                            label=f"{init} init ({len(curves)} seeds)")
        for ax, (_, title, _) in zip(row, keys):
            ax.set_visible(bool(ax.lines))   # AGW has no graph weight
            _panel(ax, f"{method.upper()}: {title}", "epoch", fontsize=9)
        row[0].legend(fontsize=7)
    _save(fig, out / "finetune_curves.png")


def _paired(a, b, seeds):
    """MMGL-minus-random cells for Rank-1 and mAP: mean ± standard error, then each seed."""
    cells = []
    for key in ("rank1", "mAP"):
        d = np.array([a[s][key] - b[s][key] for s in seeds]) * 100
        se = f"{d.std(ddof=1) / np.sqrt(len(d)):.1f}" if len(d) > 1 else "–"
        cells.append(f"{d.mean():+.1f} ± {se} ({', '.join(f'{x:+.1f}' for x in d)})")
    return cells


def paired_rows(out, method, feature):
    """MMGL minus random init, seed by seed (same seed = same identity batches and head
    initialisation): mean difference ± its standard error (std / sqrt(n))."""
    finals = finetune_finals(out, method, feature)
    seeds = sorted(set(finals.get("mmgl", {})) & set(finals.get("random", {})))
    if not seeds:
        return []
    cells = _paired(finals["mmgl"], finals["random"], seeds)
    return [f"| {method.upper()} | {len(seeds)} | {cells[0]} | {cells[1]} |"]


def claims_rows(out, pre, sources):
    """AGW from each pre-training source ({folder prefix: configuration}) and from random
    weights, over the seeds that every source has: the transfer / data-efficiency table."""
    finals = finetune_finals(out, "agw", "FC", [*sources, "random"])
    seeds = sorted(set.intersection(*[set(finals.get(i, {})) for i in [*sources, "random"]]))
    if not seeds:
        return []
    rows = ["| pre-trained on | steps | held-out perm acc of the checkpoint | seeds | Rank-1 % | mAP % | "
            "Rank-1 vs random (paired) | mAP vs random (paired) |", "|---|---|---|---|---|---|---|---|"]
    for init, name in [*sources.items(), ("random", None)]:
        r1 = [finals[init][s]["rank1"] for s in seeds]
        mAP = [finals[init][s]["mAP"] for s in seeds]
        if name is None:
            rows.append(f"| random weights | – | – | {len(seeds)} | {_mean_std(r1)} | {_mean_std(mAP)} | – | – |")
            continue
        last = [x for x in pre[name]["log"] if "val/perm_acc" in x][-1]
        cells = _paired(finals[init], finals["random"], seeds)
        rows.append(f"| {PRETRAIN[name][1]} | {last['step']} | {100 * last['val/perm_acc']:.1f}% | {len(seeds)} | "
                    f"{_mean_std(r1)} | {_mean_std(mAP)} | {cells[0]} | {cells[1]} |")
    return rows


def plot(pre, out):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, r) in enumerate(pre.items()):
        log = [x for x in r["log"] if "val/perm_acc" in x]
        steps = [x["step"] for x in log]
        style = dict(marker=".", label=PRETRAIN[name][1], color=f"C{i}")   # one colour per run, all panels
        axes[0].plot(steps, [100 * x["val/perm_acc"] for x in log], **style)
        axes[1].plot(steps, [100 * x["val/stripe_acc"] for x in log], **style)
        if "train/pcc" in log[0]:
            axes[2].plot(steps, [x["train/pcc"] for x in log], **style)
    for ax, title in zip(axes, ("held-out whole-permutation accuracy (%)", "held-out stripe accuracy (%)",
                                "PCC loss (training batches, epoch mean)")):
        _panel(ax, title, "training step")
    axes[0].legend(fontsize=8)
    _save(fig, out / "pretrain_curves.png")


def _at(log, key, i):
    v = log[i].get(key) if len(log) > abs(i) else None
    return "–" if v is None else f"{100 * v:.0f}%"


def diagnostics_table(pre):
    """Rows of the mechanism table from runs that logged train.py --diag (the probes and the
    gradient cosine/norms); [] when none did."""
    rows = []
    for name, r in pre.items():
        log = [x for x in r["log"] if "val/probe_backbone" in x]
        if not log:
            continue
        cos = [x["train/grad_cos_layer4"] for x in log if "train/grad_cos_layer4" in x]
        ratio = [x["train/grad_norm_pcc_layer4"] / max(x["train/grad_norm_perm_layer4"], 1e-12) for x in log
                 if x.get("train/grad_norm_pcc_layer4")]
        ratio3 = [x["train/grad_norm_pcc_layer3"] / max(x["train/grad_norm_perm_layer3"], 1e-12) for x in log
                  if x.get("train/grad_norm_pcc_layer3")]
        med = lambda xs, f: f.format(float(np.median(xs))) if xs else "–"   # noqa: E731
        rows.append(f"| {PRETRAIN[name][1]} | {_at(log, 'val/probe_backbone', 0)} -> {_at(log, 'val/probe_backbone', 9)} "
                    f"-> {_at(log, 'val/probe_backbone', -1)} | {_at(log, 'val/probe_pcc', 0)} -> "
                    f"{_at(log, 'val/probe_pcc', -1)} | {med(cos, '{:+.3f}')} | {med(ratio, '{:.0f}')} | "
                    f"{med(ratio3, '{:.0f}')} | {_at(log, 'val/head_alive', 0)} -> {_at(log, 'val/head_alive', -1)} |")
    if not rows:
        return []
    return ["## Mechanism diagnostics", "",
            "Linear probes (logistic regression, `diagnostics.py`) predicting which ORIGINAL stripe each "
            "shuffled stripe of a held-out image shows, trained on half of the held-out identities and "
            "scored on the other half (chance 1/6): from the backbone's stripe-pooled features and from "
            "the PCC embeddings (shuffled order only), after epoch 1 -> 10 -> the last. Gradients: on "
            "the last training batch of every epoch, the cosine between the permutation loss's and the "
            "(unweighted) PCC loss's gradients on layer4, and the ratio of their norms on layer4 and "
            "layer3 (median over epochs). Head units alive: the share of the permutation head's hidden "
            "(fc1) units that fire for at least one held-out image, after epoch 1 -> the last (runs "
            "before this diagnostic existed: –); a head with none alive gives every image one matrix.", "",
            "| configuration | probe, backbone | probe, PCC embedding | grad cosine layer4 | "
            "\\|g_PCC\\| / \\|g_perm\\| layer4 | same, layer3 | head units alive |",
            "|---|---|---|---|---|---|---|"] + rows + [""]


def plot_diagnostics(pre, out):
    runs = {n: [x for x in r["log"] if "val/probe_backbone" in x] for n, r in pre.items()}
    runs = {n: log for n, log in runs.items() if log}
    if not runs:
        return
    fig, axes = plt.subplots(1, 5, figsize=(25, 4))
    for i, (name, log) in enumerate(runs.items()):
        style = dict(marker=".", label=PRETRAIN[name][1], color=f"C{i % 10}", ls="-" if i < 10 else "--")
        steps = [x["step"] for x in log]
        axes[0].plot(steps, [100 * x["val/probe_backbone"] for x in log], **style)
        pcc = [(x["step"], 100 * x["val/probe_pcc"]) for x in log if x.get("val/probe_pcc") is not None]
        if pcc:
            axes[1].plot(*zip(*pcc), **style)
        alive = [(x["step"], 100 * x["val/head_alive"]) for x in log if "val/head_alive" in x]
        if alive:
            axes[4].plot(*zip(*alive), **style)
        g = [x for x in log if x.get("train/grad_norm_pcc_layer4")]
        if g:
            axes[2].plot([x["step"] for x in g], [x["train/grad_cos_layer4"] for x in g], **style)
            axes[3].plot([x["step"] for x in g], [x["train/grad_norm_pcc_layer4"] / max(x["train/grad_norm_perm_layer4"], 1e-12)
                                                  for x in g], **style)
    for ax, title in zip(axes, ("probe: original stripe from backbone stripe features (%)",
                                "probe: original stripe from PCC embeddings (%)",
                                "cosine(grad perm, grad PCC), layer4", "|grad PCC| / |grad perm|, layer4 (off the top: "
                                "saturated head)", "permutation head: hidden units alive on held-out images (%)")):
        _panel(ax, title, "training step", fontsize=9)
    axes[3].set_yscale("log")
    axes[3].set_ylim(0.1, 1e4)   # above: a saturated head whose permutation gradient is ~0
    axes[0].legend(fontsize=7)
    _save(fig, out / "diagnostics.png")


def pcc_span(log):
    """The PCC loss from the first epoch it was on to the last ("–" without PCC). A run that
    waits for --pcc_start_acc logs the loss at weight 0 before; one that never got there says so."""
    if "train/pcc" not in log[-1]:
        return "–"
    on = next((x for x in log if x.get("train/pcc_weight", 1) > 0), None)   # older logs: no weight, on
    return f"{on['train/pcc']:.3f} -> {log[-1]['train/pcc']:.3f}" if on else "never on"


def report(out, pre, chosen, args):
    lines = ["# MMGL study on synthetic SYSU-MM01", "",
             f"`python tools/study.py --out {args.out} --arch {args.arch} --img_h {args.img_h} --img_w {args.img_w} "
             f"--num_ids {args.num_ids} --configs {args.configs} --epochs {args.epochs} "
             + (f"--ft_from {args.ft_from} " if args.ft_from else "")
             + (f"--ft_also {args.ft_also} " if args.ft_also else "")
             + f"--ft_epochs {args.ft_epochs} --seeds {args.seeds} --ddag_seeds {args.ddag_seeds}"
             + (f" --ddag_variants {args.ddag_variants}" if args.ddag_variants else "")
             + f"` ({args.arch}, {args.img_h}x{args.img_w}, pre-training batch "
             f"{args.batch_size}+{args.batch_size}, lr 0.1, 1 warm-up epoch, cosine).", "",
             "## Pre-training: held-out permutation accuracy", "",
             "| configuration | steps | held-out perm acc (RGB / IR) | held-out stripe acc | best perm acc "
             "(epoch) | first epoch >= 20% | noise-free MSE | PCC loss, first epoch on -> last | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in pre.items():
        log = [x for x in r["log"] if "val/perm_acc" in x]
        if not log:
            continue
        last = log[-1]
        best = max(log, key=lambda x: x["val/perm_acc"])
        hit = next((x["epoch"] + 1 for x in log if x["val/perm_acc"] >= 0.2), None)
        pcc = pcc_span(log)
        minutes = sum(x["time"] for x in r["log"]) / 60
        lines.append(f"| {PRETRAIN[name][1]} | {last['step']} | {100 * last['val/perm_acc']:.1f}% "
                     f"({100 * last['val/perm_acc_rgb']:.1f} / {100 * last['val/perm_acc_ir']:.1f}) | "
                     f"{100 * last['val/stripe_acc']:.1f}% | {100 * best['val/perm_acc']:.1f}% "
                     f"({best['epoch'] + 1}) | {hit or 'never'} | {log[0]['val/perm_mse']:.4f} -> "
                     f"{last['val/perm_mse']:.4f} | {pcc} | {minutes:.1f} min |")
    lines += ["", "Chance: whole permutation 1/720 = 0.14% at K=6 (1/6 at K=3), stripe 1/K. The held-out "
              "set is test-split identities only, each image with a fixed permutation; no augmentation, "
              "no Gumbel noise; a uniform output's noise-free MSE is 0.139 at K=6.",
              "", "![pre-training curves](pretrain_curves.png)", ""]
    diag = diagnostics_table(pre)
    if diag:
        lines += diag + ["![diagnostics](diagnostics.png)", ""]
    rows = [row for m, feature in TESTED.items() for row in finetune_table(out, m, feature)]
    if chosen and rows:
        acc = [x for x in pre[chosen]["log"] if "val/perm_acc" in x][-1]["val/perm_acc"]
        lines += ["## Fine-tuning: MMGL init vs random init", "",
                  f"MMGL checkpoint: `{chosen}` ({PRETRAIN[chosen][1]}), held-out permutation "
                  f"accuracy {100 * acc:.1f}%. Same budget for both: {args.ft_epochs} epochs, lr 0.1, no "
                  "warm-up" + (" (DDAG_PLAIN: DDAG without `--wpa --graph`; DDAG_WARM: 2 warm-up epochs; "
                  "DDAG_LONG: twice the epochs)" if any((out / m).is_dir() for m in FINETUNE if m.startswith("ddag_"))
                  else "") + ". Rank-1/mAP: each run's final test (mean over the 10 gallery trials), "
                  "then mean ± std over seeds (per-seed Rank-1 in brackets). First step: the losses, the "
                  "pooled features' mean L2 norm and mean pairwise distance of the very first training step.", "",
                  "| method | init | seeds | Rank-1 % | mAP % | first-step ID loss | first-step triplet "
                  "loss | first-step feature norm / pairwise distance |", "|---|---|---|---|---|---|---|---|"]
        lines += rows
        paired = [row for m, feature in TESTED.items() for row in paired_rows(out, m, feature)]
        if paired:
            lines += ["", "Paired by seed (MMGL minus random init; mean ± standard error over seeds, "
                      "per-seed differences in brackets, percentage points):", "",
                      "| method | seeds | Rank-1 difference | mAP difference |", "|---|---|---|---|"] + paired
        dynamics = [row for m in TESTED for row in dynamics_rows(out, m)]
        lines += ["", "How the runs trained: the training means of the first -> the last epoch, averaged "
                  "over the seeds (ID loss: the global feature's; the pooled feature's L2 norm before "
                  "BNNeck; wG: DDAG's graph-loss weight 1 / (1 + previous epoch's instance loss)).", "",
                  "| method | init | seeds | epochs | " + " | ".join(t for _, t, _ in DYNAMICS) + " |",
                  "|---" * (4 + len(DYNAMICS)) + "|"] + dynamics + ["", "![fine-tuning curves](finetune_curves.png)"]
        also = [n for n in args.ft_also.split(",") if n]
        claims = claims_rows(out, pre, {"mmgl": chosen, **{f"from_{n}": n for n in also}}) if also else []
        if claims:
            lines += ["", "## Transfer and data efficiency (AGW on SYSU-MM01)", "",
                      "AGW fine-tuned on the study's SYSU-MM01 (same budget as above) from the default "
                      "configuration pre-trained on each set for the same number of steps, and from random "
                      "weights; seeds that every row has (paired by seed: MMGL minus random, mean ± "
                      "standard error, then each seed).", ""] + claims
        # the chosen checkpoint, every other finished K=6 one, and random weights
        ckpts = {n: r["ckpt"] for n, r in pre.items() if r["ckpt"] and "_k6_" in n}
        # a run whose checkpoint was not kept keeps the row measured while it was there (and with
        # no checkpoint left, the whole table stands as measured: no data needed to report it)
        old = out / "feature_scale.json"
        kept = json.loads(old.read_text()) if old.is_file() else {}
        scale = feature_scale(ckpts, out / "data" / "SYSU-MM01", arch=args.arch) if ckpts or not kept else {}
        scale = {**{n: v for n, v in kept.items() if n not in scale}, **scale}
        cols = list(scale["random"])
        lines += ["", "## Feature scale at the first fine-tuning step", "",
                  f"AGW network ({args.arch}) with its backbone from each finished K=6 pre-training run or "
                  "from random weights, 4 identity batches (8 ids x 4 RGB + 4 IR), train-time augmentation, "
                  "BN in train mode, no update:", "",
                  "| backbone | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {PRETRAIN[n][1] if n in PRETRAIN else n} | " + " | ".join(f"{scale[n][c]:.2f}" for c in cols)
                  + " |" for n in scale]
        (out / "feature_scale.json").write_text(json.dumps(scale, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def check_args(args):
    """Every flag's rule, before anything is made."""
    for name in ("jobs", "threads", "epochs", "num_ids", "batch_size", "steps_per_epoch", "ft_epochs",
                 "img_h", "img_w"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('batch_size', 'batch-size')} must be >= 1, got {getattr(args, name)}")
    for name in ("seeds", "ddag_seeds"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for v in args.ddag_variants.split(","):
        if v and f"ddag_{v}" not in FINETUNE:
            raise UserError(f"--ddag_variants: unknown variant {v!r} (known: "
                            + ", ".join(m[5:] for m in FINETUNE if m.startswith("ddag_")) + ")")
    if args.img_h % 6:
        raise UserError(f"--img_h must be a multiple of 6 (the K=6 stripes), got {args.img_h}")


def main(args):
    check_args(args)
    out = Path(args.out)
    out = out if out.is_absolute() else REPO_ROOT / out
    args.configs = {"readings": READINGS, "screen": SCREEN}.get(args.configs, args.configs)
    also = [n for n in args.ft_also.split(",") if n]
    for name in args.configs.split(",") + ([args.ft_from] if args.ft_from else []) + also:
        if name not in PRETRAIN:
            raise UserError(f"--configs: unknown configuration {name!r} (python tools/study.py --help lists them)")
    names = args.configs.split(",")
    if set(also) - set(names):
        raise UserError(f"--ft_also {','.join(sorted(set(also) - set(names)))}: not among --configs, so "
                        f"nothing pre-trains it")
    if args.report:
        pre = pretrain_results(out, args)
        if not pre:
            raise UserError(f"--report: no pre-training run of --configs under {out} to report (run the study first)")
        plot(pre, out)
        plot_diagnostics(pre, out)
        plot_finetune(out, TESTED)
        report(out, pre, args.ft_from or None, args)
        return
    data = prepare_data(out, args)
    # K=6 runs first: the fine-tuning starts from one of them and runs beside the others
    k6 = [n for n in names if "_k6_" in n]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        first = submit(pool, pretrain_jobs(out, data, args, k6), args)
        rest = submit(pool, pretrain_jobs(out, data, args, [n for n in names if n not in k6]), args)
        print(f"==> pre-training: {len(first) + len(rest)} run(s) to do", flush=True)
        wait(first)
        pre = pretrain_results(out, args)
        # the MMGL init: the finished K=6 run with the highest final held-out permutation accuracy
        scored = [(r["log"][-1].get("val/perm_acc", 0), n) for n, r in pre.items() if r["ckpt"] and n in k6]
        chosen = args.ft_from or (max(scored)[1] if scored else None)
        if chosen and chosen not in pre:
            raise UserError(f"--ft_from {chosen}: that configuration has no pre-training run under {out}")
        if chosen and (args.seeds or args.ddag_seeds):
            inits = {"mmgl": pre[chosen]["ckpt"], **{f"from_{n}": pre[n]["ckpt"] for n in also}, "random": None}
            jobs = finetune_jobs(out, data, inits, args)
            print(f"==> fine-tuning from {chosen}: {len(jobs)} run(s) to do", flush=True)
            rest += submit(pool, jobs, args)
        wait(rest)
    pre = pretrain_results(out, args)
    plot(pre, out)
    plot_diagnostics(pre, out)
    plot_finetune(out, TESTED)
    report(out, pre, chosen, args)


if __name__ == "__main__":
    cli(lambda: main(get_args_parser().parse_args()))
