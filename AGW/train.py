"""AGW cross-modality fine-tuning (Ye et al., TPAMI 2021), e.g. from an MMGL checkpoint:

    cd AGW && python train.py --dataset sysu --mode all --lr 0.1 --method agw --gpu 0 --resume CKPT

Loss per step (the authors' train.py): the identity loss (cross-entropy on the BNNeck
classifier's logits) plus a triplet loss on the pooled features, over the joint batch of
--batch-size identities x --num_pos RGB + --num_pos IR images. The triplet loss is the
weighted regularisation triplet (WRT: softmax-weighted positive and negative distances,
soft margin) for AGW, and the batch-hard triplet with --margin for the baseline.

Everything generic (data, --resume, optimiser and lr schedule, AMP, DDP, testing,
checkpoints, logs) lives in ../finetune.py.
"""
import sys
from pathlib import Path

TOOL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOL_DIR.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import finetune  # noqa: E402
from loss import TripletLoss, TripletLoss_WRT  # noqa: E402
from model_agw import FEATURE_NAMES, add_model_args, builder, embed_net  # noqa: E402
from utils import cli  # noqa: E402


def get_parser():
    p = finetune.get_args_parser("AGW / baseline cross-modality fine-tuning", epochs=80,
                                 milestones=(20, 50))
    add_model_args(p)
    p.add_argument("--wrt_stable", action="store_true",
                   help="numerically stable WRT weights (default: the authors' form, whose "
                        "negative term vanishes once distances exceed ~15)")
    return p


def make_step(args):
    criterion_id = nn.CrossEntropyLoss()
    criterion_tri = (TripletLoss_WRT(stable=args.wrt_stable) if args.method == "agw"
                     else TripletLoss(margin=args.margin))

    def step(net, x_rgb, x_ir, labels_rgb, labels_ir, epoch, state):
        labels = torch.cat((labels_rgb, labels_ir), 0)
        feat, logits = net(x_rgb, x_ir)            # RGB then IR along the batch
        loss_id = criterion_id(logits.float(), labels)
        loss_tri, _ = criterion_tri(*finetune.gather_for_loss(feat, labels, args))
        acc = (logits.argmax(1) == labels).float().mean()
        # feat_norm / feat_dist: the pooled features' mean L2 norm and mean pairwise distance
        # (what the triplet loss scales with)
        return loss_id + loss_tri, {"id_loss": loss_id, "tri_loss": loss_tri, **finetune.feature_scale(feat),
                                    "acc": acc}

    return step


def main():
    args = get_parser().parse_args()
    if args.test_only:
        return finetune.test_main(args, builder(args), FEATURE_NAMES, TOOL_DIR)
    # The authors keep the best checkpoint by the FC feature's Rank-1 (their cmc_att).
    return finetune.train(args, builder(args), make_step(args), embed_net.NEW_MODULES,
                          args.method, milestones=(20, 50), feature_names=FEATURE_NAMES,
                          tool_dir=TOOL_DIR, best_by="FC")


if __name__ == "__main__":
    cli(main)
