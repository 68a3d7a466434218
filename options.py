"""The flag groups every stage shares (pre-training, AGW, DDAG, their test scripts), declared
once as parent parsers (``argparse`` ``parents=``, as DINO and MAE do) and checked once by
:func:`check`. A stage adds its own flags and changes a shared default with
``parser.set_defaults``:

    p = cli.ArgumentParser(description="...", parents=options.parents())
    p.set_defaults(epochs=100, save_epoch=10)
"""
import argparse

import cli
import datasets
from cli import UserError

ARCHS = ("resnet50", "resnet18")


def data_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="sysu", help=f"benchmark: {' | '.join(datasets.NAMES)} "
                   "(folder: your unlabelled rgb/ and ir/ images, pre-training only; pre-training "
                   "also takes several sets at once, comma-separated: sysu,llcm)")
    g.add_argument("--data_path", default=None, help="dataset folder (default: data/SYSU-MM01, "
                   "data/RegDB, ... under the repository root); several sets: one folder each, "
                   "comma-separated in the --dataset order")
    g.add_argument("--trial", default=1, type=int, help="RegDB split 1..10")
    g.add_argument("--img_h", default=288, type=int, help="image height")
    g.add_argument("--img_w", default=144, type=int, help="image width")
    g.add_argument("--workers", default=4, type=int, help="data loading worker processes (they only "
                   "slice uint8 arrays or decode test images)")
    return p


def model_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("backbone")
    g.add_argument("--arch", default="resnet50", help=" | ".join(ARCHS))
    g.add_argument("--stream", default="two", help="two: modality-specific stems (conv1/bn1), the rest "
                   "shared; one: every layer shared by both modalities")
    g.add_argument("--pretrained", default=None, help="local torchvision-format ImageNet ResNet "
                   "weights for the backbone (never downloaded)")
    return p


def optim_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", default=0.1, type=float, help="learning rate (fine-tuning: of the new "
                   "modules, the backbone gets 0.1x)")
    g.add_argument("--epochs", default=100, type=int, help="epochs (numbered 0..epochs-1)")
    g.add_argument("--warmup_epochs", default=10, type=int, help="linear warm-up lr*(epoch+1)/W over "
                   "the first W epochs (0: none)")
    g.add_argument("--iters_per_epoch", default=0, type=int, help="steps per epoch (0: the stage's own epoch: "
                   "pre-training one pass over the larger modality, fine-tuning the authors' "
                   "int(N / (batch-size x num_pos)) + 1 identity batches). Fewer steps are the first ones of "
                   "that epoch; more keep drawing batches the same way (pre-training: a small set trained "
                   "for a big one's steps; fine-tuning: a quick check)")
    g.add_argument("--seed", default=0, type=int, help="random seed")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    return p


def runtime_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("device and speed")
    g.add_argument("--gpu", default="0", help="CUDA device index, or 'cpu'")
    g.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast where "
                   "supported, else fp16 autocast + GradScaler")
    g.add_argument("--channels_last", default=True, action=argparse.BooleanOptionalAction,
                   help="channels-last (NHWC) memory layout for the network and its input")
    g.add_argument("--compile", action="store_true", help="torch.compile the training network")
    g.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm under torchrun")
    g.add_argument("--gather", action="store_true", help="under torchrun: the batch-wise loss "
                   "(PCC's neighbours, the triplet's negatives) sees the batches of all ranks")
    return p


def output_parser():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--resume", "-r", default=None, help="checkpoint to continue from or load: a path "
                   "or a name under --model_path")
    g.add_argument("--resume_anyway", action="store_true", help="continue a <run>_last.pth although "
                   "the data, batch or schedule flags differ from the ones it was written with (not an "
                   "exact resume; the differences are printed)")
    g.add_argument("--overwrite", action="store_true", help="start this run although outputs of a run "
                   "of the same name exist (its checkpoints and logs are removed first); without it such a "
                   "run stops with a message")
    g.add_argument("--trust-checkpoint", dest="trust_checkpoint", action="store_true",
                   help="unpickle --resume fully (only for files you trust)")
    # the path rule (cli.py): given paths are relative to the current folder, the defaults
    # to the script's folder
    g.add_argument("--model_path", default=None, help="checkpoint folder (default: save_model/ in "
                   "the script's folder)")
    g.add_argument("--log_path", default=None, help="text and JSON-lines log folder (default: log/ "
                   "in the script's folder)")
    g.add_argument("--vis_log_path", default=None, help="TensorBoard folder (default: log/vis_log/ "
                   "in the script's folder)")
    g.add_argument("--save_epoch", default=10, type=int, help="write <run>_epoch_<E>.t every this "
                   "many epochs")
    g.add_argument("--print_freq", default=50, type=int, help="print every N steps (and the last)")
    return p


def parents():
    """Every shared group, in the order --help lists them."""
    return [data_parser(), model_parser(), optim_parser(), runtime_parser(), output_parser()]


# path flags: given empty (an unset shell variable: --resume $CKPT) is an error, never "not given"
PATH_FLAGS = ("data_path", "pretrained", "resume", "model_path", "log_path", "vis_log_path")


def check(args):
    """The shared flags' rules, checked once for every stage; returns the benchmark."""
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if value is not None and not str(value).strip():
            raise UserError(f"--{name} was given an empty value (an unset shell variable?); give a path "
                            f"or leave the flag out")
    bench = datasets.get(args.dataset)
    args.dataset = ",".join(n.strip() for n in args.dataset.split(","))   # "sysu " is sysu
    cli.choice_check("--arch", args.arch, ARCHS)
    cli.choice_check("--stream", args.stream, ("two", "one"))
    for name in ("img_h", "img_w", "epochs", "save_epoch", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("workers", "warmup_epochs", "iters_per_epoch"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    cli.check_schedule(args)
    bench.check_args(args)
    return bench


OUTPUT_DEFAULTS = {"model_path": "save_model", "log_path": "log", "vis_log_path": "log/vis_log"}


def resolve_paths(args, script_dir):
    """The output folders by the path rule (cli.resolve_path): as given, relative to the
    current folder, else the defaults in ``script_dir``."""
    for key, default in OUTPUT_DEFAULTS.items():
        setattr(args, key, str(cli.resolve_path(getattr(args, key), default, script_dir)))
