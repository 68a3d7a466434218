"""AGW cross-modality fine-tuning (Ye et al., TPAMI 2021), e.g. from an MMGL checkpoint:

    cd AGW && python train.py --dataset sysu --mode all --lr 0.1 --method agw --gpu 0 --resume CKPT

Loss per step (the authors' train.py): the identity loss (cross-entropy on the BNNeck
classifier's logits) plus a triplet loss on the pooled features, over the joint batch of
--batch-size identities x --num_pos RGB + --num_pos IR images. The triplet loss is the
weighted regularisation triplet (WRT: softmax-weighted positive and negative distances,
soft margin) for AGW, and the batch-hard triplet with --margin for the baseline.

``main`` is the whole run; one epoch, testing and the schedule are plain functions of
../engine_finetune.py, the checkpoints ../checkpoint.py's, the logs ../logger.py's.
"""
import sys
import time
from pathlib import Path

TOOL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOL_DIR.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import cli  # noqa: E402
import data_loader  # noqa: E402
import engine_finetune as engine  # noqa: E402
import utils  # noqa: E402
from loss import TripletLoss, TripletLoss_WRT  # noqa: E402
from model_agw import FEATURE_NAMES, add_model_args, builder  # noqa: E402



def get_parser():
    p = engine.get_args_parser("AGW / baseline cross-modality fine-tuning")   # 80 epochs, lr steps at 20, 50
    add_model_args(p)
    p.add_argument("--wrt_stable", action="store_true",
                   help="numerically stable WRT weights (default: the authors' form, whose "
                        "negative term vanishes once distances exceed ~15)")
    return p


def make_criterion(args):
    criterion_id = nn.CrossEntropyLoss()
    criterion_tri = (TripletLoss_WRT(stable=args.wrt_stable) if args.method == "agw"
                     else TripletLoss(margin=args.margin))

    def criterion(net, x_rgb, x_ir, labels_rgb, labels_ir):
        labels = torch.cat((labels_rgb, labels_ir), 0)
        feat, logits = net(x_rgb, x_ir)            # RGB then IR along the batch
        loss_id = criterion_id(logits.float(), labels)
        loss_tri, _ = criterion_tri(*engine.gather_for_loss(feat, labels, args))
        acc = (logits.argmax(1) == labels).float().mean()
        # feat_norm / feat_dist: the pooled features' mean L2 norm and mean pairwise distance
        # (what the triplet loss scales with)
        return loss_id + loss_tri, {"id_loss": loss_id, "tri_loss": loss_tri, **engine.feature_scale(feat),
                                    "acc": acc}

    return criterion


def main(args=None):
    args = args or get_parser().parse_args()
    if args.test_only:
        return engine.test_main(args, builder(args), FEATURE_NAMES, TOOL_DIR)
    # ---- flags, --resume, outputs, data, network, optimiser (every user error before the header)
    r = engine.setup(args, builder(args), args.method, TOOL_DIR)
    try:
        criterion = make_criterion(args)
        aug = data_loader.DeviceAugment(args.img_h, args.img_w, pad=args.pad, device=r.device)

        # ---- train; test every --test_every epochs; best by FC Rank-1 (the authors' cmc_att)
        print("==> Start Training...")
        for epoch in range(r.start_epoch, args.epochs):
            t0 = time.time()
            lr = engine.adjust_learning_rate(r.optimizer, epoch, args)
            loader = engine.identity_loader(r.data, epoch, args, r.device)
            stats = engine.train_one_epoch(r.train_net, criterion, loader, aug, r.optimizer, r.scaler, epoch, lr,
                                           args, r.device, r.log, r.last_path)
            metrics = None
            if utils.is_main_process():
                if engine.test_due(epoch, args):
                    print(f"Test Epoch: {epoch}")
                    metrics = engine.evaluate(r.net, args, r.device, FEATURE_NAMES, r.testset, per_trial=False,
                                              tag=f"{r.run}_epoch_{epoch + 1}", writer=r.log.writer,
                                              step=r.log.global_step)
                    r.best = engine.update_best(r.best, metrics, "FC", epoch, r.net, r.best_path)
                engine.save_epoch(r.net, r.optimizer, r.scaler, epoch, args, r.run, r.best, metrics, "FC", r.log)
                r.log.epoch(epoch, time.time() - t0, train=stats, test=metrics)
            utils.barrier()
        engine.summary(r.best, r.log.t_start, r.best_path)
    finally:
        r.log.close()
        utils.cleanup()


if __name__ == "__main__":
    cli.cli(main)
