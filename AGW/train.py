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

import checkpoint  # noqa: E402
import cli  # noqa: E402
import data_loader  # noqa: E402
import datasets  # noqa: E402
import engine_finetune as engine  # noqa: E402
import logger  # noqa: E402
import utils  # noqa: E402
from loss import TripletLoss, TripletLoss_WRT  # noqa: E402
from model_agw import FEATURE_NAMES, AGWNet, add_model_args, builder  # noqa: E402

MILESTONES = (20, 50)


def get_parser():
    p = engine.get_args_parser("AGW / baseline cross-modality fine-tuning", epochs=80,
                               milestones=MILESTONES)
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
    build = builder(args)   # checks the network flags before any data work
    engine.prepare_args(args, TOOL_DIR)
    if args.milestones is None:
        args.milestones = list(MILESTONES)
    resume = checkpoint.read_resume(args, build) if args.resume else None   # fails before any data work
    device = utils.init_device(args.gpu)
    utils.set_seed(args.seed + utils.get_rank(), args.deterministic)
    run = engine.run_name(args, args.method)
    best_path, last_path = Path(args.model_path) / f"{run}_best.t", Path(args.model_path) / f"{run}_last.pth"
    log = logger.RunLog(args, run)
    try:
        # ---- data, network, optimiser, --resume
        data, testset = datasets.get(args.dataset).train_data(args), engine.TestSet(args)
        log.open(args, device, engine.data_stats(data, testset))
        net, train_net = engine.prepare_net(build(data.num_classes), args, device)
        optimizer = engine.build_optimizer(net, args, AGWNet.NEW_MODULES)
        _, scaler = utils.amp_setup(args.amp, device)
        start_epoch, best, state = 0, None, {}
        if resume:
            start_epoch, best = checkpoint.load_resume(net, args, optimizer, scaler, state, loaded=resume)
        elif not args.pretrained:
            print("note: no --resume and no --pretrained: the backbone starts from random weights")
        engine.start_log(log, start_epoch, state, data, args)
        criterion = make_criterion(args)
        aug = data_loader.DeviceAugment(args.img_h, args.img_w, pad=args.pad, device=device)

        # ---- train; test every --test_every epochs; best by FC Rank-1 (the authors' cmc_att)
        print("==> Start Training...")
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            lr = engine.adjust_learning_rate(optimizer, epoch, args)
            loader = engine.identity_loader(data, epoch, args, device)
            stats = engine.train_one_epoch(train_net, criterion, loader, aug, optimizer, scaler, epoch, lr,
                                           args, device, log, last_path)
            metrics = None
            if utils.is_main_process():
                if engine.test_due(epoch, args):
                    print(f"Test Epoch: {epoch}")
                    metrics = engine.evaluate(net, args, device, FEATURE_NAMES, testset, per_trial=False,
                                              tag=f"{run}_epoch_{epoch + 1}", writer=log.writer,
                                              step=log.global_step)
                    best = engine.update_best(best, metrics, "FC", epoch, net, best_path)
                engine.save_epoch(net, optimizer, scaler, epoch, args, run, best, metrics, "FC", log)
                log.epoch(epoch, time.time() - t0, train=stats, test=metrics)
            utils.barrier()
        engine.summary(best, log.t_start, best_path)
    finally:
        log.close()
        utils.cleanup()


if __name__ == "__main__":
    cli.cli(main)
