"""What the benchmark scripts share: the device flags and their device-dependent defaults,
the checks of their values, and the start of a run (threads, cuDNN autotuning, a line
naming the device)."""
import argparse

import torch

import cli

THREADS_HELP = ("torch intra-op threads (default: 1 on the CPU, so the result does not hinge on "
                "oversubscribed cores of a shared machine, and each side's main process gets one "
                "core; 0: torch's default)")


def add_device_args(p, reference):
    """--device --arch --amp --channels_last --threads --seed; ``reference`` names the other
    side in the help ("the reference", "the authors' way")."""
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--arch", default=None, help="resnet18 | resnet50 (default: resnet18 on the "
                   "CPU, resnet50 on CUDA)")
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction,
                   help=f"ours with mixed precision (default: on for CUDA); {reference} is fp32")
    p.add_argument("--channels_last", default=True, action=argparse.BooleanOptionalAction,
                   help="ours channels-last, as the trainers' default (default: on)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0)


def resolve_defaults(args, defaults, at_least_1=(), at_least_0=()):
    """Check --device, fill every None in ``args`` named in ``defaults`` ({name: (cpu value,
    cuda value)}; arch, amp and threads are always there) and check the value bounds."""
    cli.choice_check("--device", args.device, ("cpu", "cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise cli.UserError("--device cuda but no CUDA device is available")
    defaults = {"arch": ("resnet18", "resnet50"), "amp": (False, True), "threads": (1, 0),
                **defaults}
    for name, (cpu_value, cuda_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda_value if args.device == "cuda" else cpu_value)
    cli.choice_check("--arch", args.arch, ("resnet18", "resnet50"))
    for low, names in ((1, at_least_1), (0, ("threads", *at_least_0))):
        for name in names:
            if getattr(args, name) < low:
                raise cli.UserError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    return args


def start(args):
    """Threads and cuDNN autotuning as asked; returns (device, a few words naming it)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return device, torch.cuda.get_device_name(device)
    return device, f"CPU, {torch.get_num_threads()} torch threads"
