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

``main`` is the whole run (lr steps at 30 and 50, testing every 2 epochs, best checkpoint by
FC_att Rank-1); one epoch, testing and the schedule are plain functions of
../engine_finetune.py, the checkpoints ../checkpoint.py's, the logs ../logger.py's.
"""
import sys
import time
from pathlib import Path

TOOL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOL_DIR.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: E402
import data_loader  # noqa: E402
import engine_finetune as engine  # noqa: E402
import test_ddag  # noqa: E402
import utils  # noqa: E402
from cli import UserError  # noqa: E402
from loss import TripletLoss  # noqa: E402
from model_ddag import add_model_args, build_adjacency, builder  # noqa: E402

def get_parser():
    p = engine.get_args_parser("DDAG cross-modality fine-tuning", epochs=80, milestones=(30, 50))
    add_model_args(p)
    p.add_argument("--lambda0", default=1.0, type=float,
                   help="multiplies the dynamic graph-loss weight wG (1.0: the authors' loss)")
    return p


def method_name(args):
    return "ddag" + "_wpa" * args.wpa + "_proj" * args.wpa_proj + "_graph" * args.graph


def make_criterion(args, state):
    """The step loss; ``state['wG']`` is the graph weight of the current epoch."""
    triplet = TripletLoss(margin=args.margin)

    def criterion(net, x_rgb, x_ir, labels_rgb, labels_ir):
        labels = torch.cat((labels_rgb, labels_ir), 0)
        adj = build_adjacency(labels) if args.graph else None
        x_pool, logits, part_logits, log_probs = net(x_rgb, x_ir, adj=adj)
        loss_id = F.cross_entropy(logits.float(), labels)
        loss_tri, _ = triplet(*engine.gather_for_loss(x_pool, labels, args))
        logs = {"id_loss": loss_id, "tri_loss": loss_tri, **engine.feature_scale(x_pool)}
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

    return criterion


def update_graph_weight(state, stats):
    # DDAG's dynamic weight: the better the instance-level features are learnt (small
    # L_inst), the more the graph term counts.
    state["wG"] = 1.0 / (1.0 + stats["inst_loss"])


def main(args=None):
    args = args or get_parser().parse_args()
    if args.lambda0 < 0:
        raise UserError(f"--lambda0 must be >= 0, got {args.lambda0}")
    if args.test_only:
        return test_ddag.run(args)   # the test script's path (the network's layout read from the checkpoint)
    # ---- flags, --resume (a <run>_last.pth brings back wG too), outputs, data, network, optimiser
    r = engine.setup(args, builder(args), method_name(args), TOOL_DIR, state={"wG": 0.0})
    names = r.net.feature_names
    try:
        criterion = make_criterion(args, r.state)
        aug = data_loader.DeviceAugment(args.img_h, args.img_w, pad=args.pad, device=r.device)

        # ---- train; wG from each epoch's L_inst; best by the last feature's Rank-1 (FC_att)
        print("==> Start Training...")
        for epoch in range(r.start_epoch, args.epochs):
            t0 = time.time()
            lr = engine.adjust_learning_rate(r.optimizer, epoch, args)
            loader = engine.identity_loader(r.data, epoch, args, r.device)
            stats = engine.train_one_epoch(r.train_net, criterion, loader, aug, r.optimizer, r.scaler, epoch, lr,
                                           args, r.device, r.log, r.last_path)
            update_graph_weight(r.state, stats)
            metrics = None
            if utils.is_main_process():
                if engine.test_due(epoch, args):
                    print(f"Test Epoch: {epoch}")
                    metrics = engine.evaluate(r.net, args, r.device, names, r.testset, per_trial=False,
                                              tag=f"{r.run}_epoch_{epoch + 1}", writer=r.log.writer,
                                              step=r.log.global_step)
                    r.best = engine.update_best(r.best, metrics, names[-1], epoch, r.net, r.best_path)
                engine.save_epoch(r.net, r.optimizer, r.scaler, epoch, args, r.run, r.best, metrics, names[-1], r.log,
                                  r.state)
                r.log.epoch(epoch, time.time() - t0, train=stats, test=metrics)
            utils.barrier()
        engine.summary(r.best, r.log.t_start, r.best_path)
    finally:
        r.log.close()
        utils.cleanup()


if __name__ == "__main__":
    cli.cli(main)
