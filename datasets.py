"""The benchmark registry: everything that differs between SYSU-MM01, RegDB and LLCM, in one
place.

Each benchmark declares its default folder, its training set, the images pre-training may
use for the held-out permutation accuracy, the query/gallery lists of its test protocol
(per gallery trial and search direction), its evaluator, and the suffix its runs are named
with. The scripts ask ``get(args.dataset)`` and hold no dataset branches, so a new benchmark
is one new class here (plus its file lists in data_manager.py and its tests).

    bench = datasets.get("regdb")
    data = bench.train_data(args)            # TrainData: uint8 images, labels, cameras
    lists = bench.test_lists(args)           # TestLists: query, union gallery, trial index
    per_trial, mean = lists.evaluate(q_feat, g_feat)
"""
import argparse
from dataclasses import dataclass

import numpy as np

import cli
import data_manager
import eval_metrics
from cli import UserError
from data_loader import PreprocessedData, RegDBData, UnionData

RGB, IR = 1, 2   # the networks' modality codes (stem 1, stem 2)


@dataclass
class TestLists:
    """One test protocol instance. The gallery is the UNION of the trial galleries (each
    image's feature is extracted once); ``trial_index[t]`` indexes trial t's gallery into
    it, in draw order (which decides ties). ``q_cams``/``g_cams`` are camera numbers, or the
    modality code where the benchmark has no cameras."""
    q_paths: list
    q_pids: np.ndarray
    q_cams: np.ndarray
    q_modal: int
    g_paths: list
    g_pids: np.ndarray
    g_cams: np.ndarray
    g_modal: int
    trial_index: list
    trials: list          # the trial numbers printed ("Test Trial: T")
    mode: str             # the protocol variant in words, e.g. 'all_single', 'visible_to_thermal'
    score: object         # (distmat, q_pids, g_pids, q_cams, g_cams) -> (cmc, mAP, mINP)
    swap: bool            # score with the trial gallery as the ranking rows (LLCM's published VIS->IR)
    camera_rule: bool     # SYSU-MM01's cam-3 query / cam-2 gallery exclusion (rank lists)
    direction: str = ""   # shown beside the trial line, e.g. "thermal to visible"

    def evaluate(self, q_feats, g_feats, rerank_args=None):
        """(per-trial [(cmc, mAP, mINP)], their mean) for L2-normalised features; with
        ``rerank_args`` (k1, k2, lambda_value) on k-reciprocal re-ranked distances."""
        return eval_metrics.evaluate_trials(q_feats, self.q_pids, self.q_cams, g_feats, self.g_pids,
                                            self.g_cams, self.trial_index, self.score, swap=self.swap,
                                            rerank_args=rerank_args)


class Benchmark:
    name = title = default_path = ""
    labelled = True   # identities and a test protocol: fine-tuning and testing can use it

    def data_path(self, args):
        """--data_path, or the benchmark's folder under the repository root."""
        return cli.resolve_path(getattr(args, "data_path", None) or None, self.default_path)

    def check_args(self, args):
        """Flag values only this benchmark constrains."""

    def run_suffix(self, args):
        """Appended to every run name (the authors': '_trial_T' on RegDB)."""
        return ""

    def train_data(self, args):
        """The training set (TrainData) of --data_path at --img_h x --img_w."""
        raise NotImplementedError

    def heldout_lists(self, data_path, trial=1):
        """{'rgb': paths, 'ir': paths}: test-split images pre-training never reads."""
        raise NotImplementedError

    def heldout_sources(self, args):
        """[(set name, heldout_lists)]: one entry per training set (data_loader.PermHeldout)."""
        return [(self.name, self.heldout_lists(self.data_path(args), args.trial))]

    def test_lists(self, args):
        raise NotImplementedError

    def scorer(self, mode):
        """(evaluator, swap) of the protocol variant ``mode`` (TestLists.mode): how the test
        scripts and a saved feature file (features.evaluate) are scored."""
        raise NotImplementedError


def _preprocessed(bench, args):
    """The training arrays of pre_process_sysu.py (SYSU-MM01, LLCM, a folder) at --img_h x --img_w."""
    data = PreprocessedData(bench.data_path(args), title=bench.title)
    data.check_size(args.img_h, args.img_w,
                    f"pass --img_h {data.img_size[0]} --img_w {data.img_size[1]}, or re-run "
                    f"{data.preprocess_cmd.removeprefix('python ')} with --img_h {args.img_h} --img_w {args.img_w}")
    return data


class SYSU(Benchmark):
    """SYSU-MM01 (Wu et al., ICCV 2017): RGB cameras 1,2,4,5, IR cameras 3,6. Training from
    the npy arrays of pre_process_sysu.py. Test: IR queries (cameras 3 and 6) against an RGB
    gallery drawn 10 times (trials 0..9), all or indoor mode, single- or multi-shot."""
    name, title, default_path = "sysu", "SYSU-MM01", "data/SYSU-MM01"

    def train_data(self, args):
        return _preprocessed(self, args)

    def heldout_lists(self, data_path, trial=1):
        root = data_manager.sysu_root(data_path)
        ids = data_manager.sysu_split_ids(root, "test")
        return {"rgb": data_manager.list_sysu_images(root, ids, data_manager.SYSU_RGB_CAMS["all"])[0],
                "ir": data_manager.list_sysu_images(root, ids, data_manager.SYSU_IR_CAMS)[0]}

    def test_lists(self, args):
        path = self.data_path(args)
        q_paths, q_pids, q_cams = data_manager.process_query_sysu(path, mode=args.mode)
        g_paths, g_pids, g_cams, index = data_manager.sysu_gallery_trials(
            path, mode=args.mode, gall_mode=args.gall_mode)
        mode = f"{args.mode}_{args.gall_mode}"
        return TestLists(q_paths, q_pids, q_cams, IR, g_paths, g_pids, g_cams, RGB, index,
                         list(range(len(index))), mode, *self.scorer(mode), camera_rule=True)

    def scorer(self, mode):
        return eval_metrics.eval_sysu, False


def _regdb_score(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20):
    return eval_metrics.eval_regdb(distmat, q_pids, g_pids, max_rank)


class RegDB(Benchmark):
    """RegDB (Nguyen et al., Sensors 2017): 412 ids, 10 visible + 10 thermal images each,
    10 random 206/206 splits (--trial 1..10) from idx/. Test: visible queries against the
    thermal gallery of the trial, or thermal to visible with --tvsearch."""
    name, title, default_path = "regdb", "RegDB", "data/RegDB"

    def check_args(self, args):
        if not 1 <= args.trial <= 10:
            raise UserError(f"--trial must be 1..10 for RegDB, got {args.trial}")

    def run_suffix(self, args):
        return f"_trial_{args.trial}"

    def train_data(self, args):
        return RegDBData(self.data_path(args), args.trial, img_h=args.img_h,
                         img_w=args.img_w, workers=args.workers)

    def heldout_lists(self, data_path, trial=1):
        return {"rgb": data_manager.process_test_regdb(data_path, trial, "visible")[0],
                "ir": data_manager.process_test_regdb(data_path, trial, "thermal")[0]}

    def test_lists(self, args):
        path = self.data_path(args)
        vis = data_manager.process_test_regdb(path, trial=args.trial, modal="visible")
        thr = data_manager.process_test_regdb(path, trial=args.trial, modal="thermal")
        (q_paths, q_pids), (g_paths, g_pids) = (thr, vis) if args.tvsearch else (vis, thr)
        q_modal, g_modal = (IR, RGB) if args.tvsearch else (RGB, IR)
        q_pids, g_pids = np.asarray(q_pids, dtype=np.int64), np.asarray(g_pids, dtype=np.int64)
        mode = "thermal_to_visible" if args.tvsearch else "visible_to_thermal"
        return TestLists(list(q_paths), q_pids, np.full(len(q_pids), q_modal), q_modal,
                         list(g_paths), g_pids, np.full(len(g_pids), g_modal), g_modal,
                         [np.arange(len(g_pids))], [args.trial], mode, *self.scorer(mode),
                         camera_rule=False, direction="thermal to visible" if args.tvsearch else "")

    def scorer(self, mode):
        return _regdb_score, False


class LLCM(Benchmark):
    """LLCM (Zhang & Wang, DEEN, CVPR 2023): low-light visible cameras 1..9, near-infrared
    1,2,4..9. Training from the npy arrays of ``pre_process_sysu.py --dataset llcm`` (the
    idx/train_vis.txt and idx/train_nir.txt lists). Test, following the DEEN authors' test
    script: every test image of the query modality against one image per (test id,
    camera) of the other, drawn 10 times (trials 0..9); visible to infrared by default,
    infrared to visible with --tvsearch. Their evaluator drops gallery items of the query's
    id AND camera, and scores visible to infrared with the roles swapped (each drawn
    near-infrared image ranks all visible queries); we score it the same way so the numbers
    compare with theirs (docs/EVALUATION.md, LLCM)."""
    name, title, default_path = "llcm", "LLCM", "data/LLCM"

    def train_data(self, args):
        return _preprocessed(self, args)

    def heldout_lists(self, data_path, trial=1):
        return {"rgb": data_manager.process_query_llcm(data_path, "vis2ir")[0],
                "ir": data_manager.process_query_llcm(data_path, "ir2vis")[0]}

    def test_lists(self, args):
        path = self.data_path(args)
        direction = data_manager.llcm_direction(args.tvsearch)
        q_paths, q_pids, q_cams = data_manager.process_query_llcm(path, direction)
        g_paths, g_pids, g_cams, index = data_manager.llcm_gallery_trials(path, direction)
        vis2ir = direction == "vis2ir"
        q_modal, g_modal = (RGB, IR) if vis2ir else (IR, RGB)
        mode = "visible_to_infrared" if vis2ir else "infrared_to_visible"
        return TestLists(q_paths, q_pids, q_cams, q_modal, g_paths, g_pids, g_cams, g_modal, index,
                         list(range(len(index))), mode, *self.scorer(mode), camera_rule=False,
                         direction=mode.replace("_", " "))

    def scorer(self, mode):
        return eval_metrics.eval_llcm, mode == "visible_to_infrared"


class Folder(Benchmark):
    """Your own unlabelled RGB and IR crops: every jpg/png/bmp under DIR/rgb/ and DIR/ir/, from
    the arrays of ``pre_process_sysu.py --dataset folder``, which also set a seeded held-out
    fraction aside (heldout_{rgb,ir}.txt) for the permutation accuracy. No identities, so
    pre-training only: fine-tuning and testing refuse it."""
    name, title, default_path = "folder", "image folder", ""
    labelled = False

    def data_path(self, args):
        if not getattr(args, "data_path", None):
            raise UserError("--dataset folder needs --data_path DIR (a folder with rgb/ and ir/)")
        return cli.resolve_path(args.data_path)

    def train_data(self, args):
        return _preprocessed(self, args)

    def heldout_lists(self, data_path, trial=1):
        return data_manager.read_folder_heldout(data_path)


class Joint(Benchmark):
    """Pre-training on several training sets at once: ``--dataset sysu,llcm --data_path
    P1,P2`` (one path per set, or none for the sets' default folders). One image size for
    all; the held-out permutation accuracy is reported per set as well. Pre-training only."""
    labelled = False

    def __init__(self, parts):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.title = " + ".join(p.title for p in parts)

    def _part_args(self, args):
        paths = [p.strip() for p in args.data_path.split(",")] if getattr(args, "data_path", None) else [None] * len(self.parts)
        if "" in paths:   # "crops," must not quietly mean the second set's default folder
            raise UserError(f"--data_path {args.data_path!r} has an empty entry; give one folder per set of "
                            f"--dataset {args.dataset}, in the same order, separated by commas")
        if len(paths) != len(self.parts):
            raise UserError(f"--dataset {args.dataset} names {len(self.parts)} sets but --data_path "
                            f"{args.data_path} gives {len(paths)}; give one folder per set, in the "
                            f"same order, separated by commas")
        return [(b, argparse.Namespace(**{**vars(args), "dataset": b.name, "data_path": p}))
                for b, p in zip(self.parts, paths)]

    def data_path(self, args):
        return ",".join(str(b.data_path(a)) for b, a in self._part_args(args))

    def check_args(self, args):
        for b, a in self._part_args(args):
            b.check_args(a)

    def run_suffix(self, args):
        return "".join(b.run_suffix(a) for b, a in self._part_args(args))

    def train_data(self, args):
        return UnionData([b.train_data(a) for b, a in self._part_args(args)])

    def heldout_sources(self, args):
        return [src for b, a in self._part_args(args) for src in b.heldout_sources(a)]


BENCHMARKS = {b.name: b for b in (SYSU(), RegDB(), LLCM(), Folder())}
NAMES = tuple(BENCHMARKS)


def get(name):
    """The registered benchmark called ``name`` (a UserError naming the choices otherwise);
    ``a,b``: the sets a and b pre-trained on together (:class:`Joint`)."""
    names = [n.strip() for n in name.split(",")]
    for n in names:
        cli.choice_check("--dataset", n, NAMES)
    if len(names) == 1:
        return BENCHMARKS[names[0]]
    if len(set(names)) < len(names):
        raise UserError(f"--dataset {name} names a set twice")
    return Joint([BENCHMARKS[n] for n in names])


def get_labelled(name, what):
    """The benchmark for a stage that needs identities (fine-tuning, testing): one clear
    line for an unlabelled folder or several sets."""
    bench = get(name)
    if not bench.labelled:
        raise UserError(f"--dataset {name}: {what} need identities and a test protocol (one of "
                        f"{', '.join(n for n, b in BENCHMARKS.items() if b.labelled)}); an "
                        f"unlabelled folder or several sets at once are for pre-training (train.py)")
    return bench
