"""Test a DDAG checkpoint (ours or the authors'):

    cd DDAG && python test_ddag.py --dataset sysu --mode all --wpa --graph --resume CKPT --gpu 0
    python test_ddag.py --dataset sysu --mode indoor --gall_mode multi --wpa --resume CKPT
    python test_ddag.py --dataset regdb --trial 1 [--tvsearch] --wpa --resume CKPT

SYSU-MM01: IR queries against the RGB gallery of each of the 10 random trials (features
extracted once), per-trial lines and 'All Average:'. RegDB: visible queries against the
thermal gallery of --trial (thermal to visible with --tvsearch). FC = the BN feature,
FC_att = the IWPA feature (networks with IWPA), both L2-normalised. The network's branches
(IWPA, graph layers, part/head counts) are read from the checkpoint; the flags are accepted
so the authors' command lines work.
"""
import sys
from pathlib import Path

TOOL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOL_DIR.parent))

import checkpoint  # noqa: E402
import engine_finetune  # noqa: E402
from cli import cli  # noqa: E402
from model_ddag import add_model_args, builder, network_layout  # noqa: E402


def run(args):
    engine_finetune.prepare_args(args, TOOL_DIR)
    loaded = engine_finetune.read_for_test(args)   # read once: the layout, then the weights
    layout = network_layout(checkpoint.network_state(loaded[1], args.resume), args)
    names = ("FC", "FC_att") if layout.get("wpa", args.wpa) else ("FC",)
    # no --pretrained ImageNet load: every tensor comes from the checkpoint
    return engine_finetune.test_main(args, builder(args, imagenet=False, **layout), names, TOOL_DIR,
                                     loaded=loaded)


def main():
    p = add_model_args(engine_finetune.get_args_parser("Test a DDAG checkpoint"))
    return run(p.parse_args())


if __name__ == "__main__":
    cli(main)
