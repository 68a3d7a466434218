"""DDAG cross-modality fine-tuning (Ye et al., ECCV 2020), e.g. from an MMGL checkpoint:

    cd DDAG && python train_ddag.py --dataset sysu --lr 0.1 --wpa --graph --gpu 0 --resume CKPT

Loss per step over the joint batch of --batch-size identities x --num_pos RGB + --num_pos IR
images (the paper's Eq. 10-11, as in the authors' train_ddag.py):

    L_inst = ID(classifier(feat)) + triplet(x_pool) + ID(classifier(feat_att))   [--wpa]
    L      = L_inst + lambda0 * wG * NLL(graph attention log-probs)               [--graph]

ID = cross-entropy; triplet = batch-hard with --margin on the pooled feature; the part-ID
term classifies the IWPA feature with the SAME classifier as the global BN feature. The
graph weight wG = 1 / (1 + mean L_inst of the previous epoch) is 0 in the first epoch (the
graph head is still random) and is kept in the resumable state, so a run resumed from its
<run>_last.pth continues with the stored value (a bare fine-tuning .t checkpoint carries no
wG: the first resumed epoch then uses 0). --lambda0 (the authors' flag, "graph attention weights", unused in
their code) scales it; the default 1.0 is their loss.

Everything generic (data, --resume, optimiser, lr schedule with steps at 30 and 50, AMP,
DDP, testing every 2 epochs, best checkpoint by FC_att Rank-1) lives in ../finetune.py.
"""
import sys
from pathlib import Path

TOOL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOL_DIR.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import finetune  # noqa: E402
from loss import TripletLoss  # noqa: E402
from model_ddag import add_model_args, build_adjacency, builder  # noqa: E402
from utils import UserError, cli  # noqa: E402

MILESTONES = (30, 50)


def get_parser():
    p = finetune.get_args_parser("DDAG cross-modality fine-tuning", epochs=80,
                                 milestones=MILESTONES)
    add_model_args(p)
    p.add_argument("--lambda0", default=1.0, type=float,
                   help="multiplies the dynamic graph-loss weight wG (1.0: the authors' loss)")
    return p


def method_name(args):
    return "ddag" + "_wpa" * args.wpa + "_proj" * args.wpa_proj + "_graph" * args.graph


def make_step(args):
    triplet = TripletLoss(margin=args.margin)

    def step(net, x_rgb, x_ir, labels_rgb, labels_ir, epoch, state):
        labels = torch.cat((labels_rgb, labels_ir), 0)
        adj = build_adjacency(labels) if args.graph else None
        x_pool, logits, part_logits, log_probs = net(x_rgb, x_ir, adj=adj)
        loss_id = F.cross_entropy(logits.float(), labels)
        loss_tri, _ = triplet(*finetune.gather_for_loss(x_pool, labels, args))
        logs = {"id_loss": loss_id, "tri_loss": loss_tri, **finetune.feature_scale(x_pool)}
        loss = loss_id + loss_tri
        if part_logits is not None:
            logs["part_loss"] = F.cross_entropy(part_logits.float(), labels)
            loss = loss + logs["part_loss"]
        logs["inst_loss"] = loss
        if log_probs is not None:
            logs["graph_loss"] = F.nll_loss(log_probs, labels)
            logs["wG"] = state["wG"]
            loss = loss + args.lambda0 * state["wG"] * logs["graph_loss"]
        logs["acc"] = (logits.argmax(1) == labels).float().mean()
        return loss, logs

    return step


def update_graph_weight(state, meters):
    # DDAG's dynamic weight: the better the instance-level features are learnt (small
    # L_inst), the more the graph term counts.
    state["wG"] = 1.0 / (1.0 + meters["inst_loss"])


def main():
    args = get_parser().parse_args()
    if args.lambda0 < 0:
        raise UserError(f"--lambda0 must be >= 0, got {args.lambda0}")
    if args.test_only:
        from test_ddag import run  # the test script's path (network layout from the checkpoint)
        return run(args)
    return finetune.train(args, builder(args), make_step(args), lambda net: net.new_modules(),
                          method_name(args), MILESTONES,
                          feature_names=("FC", "FC_att") if args.wpa else ("FC",),
                          tool_dir=TOOL_DIR, on_epoch_end=update_graph_weight,
                          state={"wG": 0.0})


if __name__ == "__main__":
    cli(main)
