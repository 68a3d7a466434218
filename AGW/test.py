"""Test an AGW checkpoint (ours or the authors'):

    cd AGW && python test.py --dataset sysu --mode all --resume CKPT --gpu 0
    python test.py --dataset sysu --mode indoor --gall_mode multi --resume CKPT
    python test.py --dataset regdb --trial 1 [--tvsearch] --resume CKPT

SYSU-MM01: IR queries against the RGB gallery of each of the 10 random trials (features
extracted once), per-trial lines and their average. RegDB: visible queries against the
thermal gallery of --trial (thermal to visible with --tvsearch). POOL = the pooled feature,
FC = the BNNeck feature, both L2-normalised.
"""
import sys
from pathlib import Path

TOOL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOL_DIR.parent))

import engine_finetune  # noqa: E402
from model_agw import FEATURE_NAMES, add_model_args, builder  # noqa: E402
from cli import cli  # noqa: E402


def main():
    p = add_model_args(engine_finetune.get_args_parser("Test an AGW / baseline checkpoint"))
    args = p.parse_args()
    return engine_finetune.test_main(args, builder(args), FEATURE_NAMES, TOOL_DIR)


if __name__ == "__main__":
    cli(main)
