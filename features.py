"""Saved test features (``--save_features DIR`` of the test scripts): the writer, the reader
and the metrics recomputed from a file.

One ``.npz`` per evaluated checkpoint (``np.savez``; plain arrays only, so
``np.load(..., allow_pickle=False)`` reads it):

================================  ====================================================
``heads``                         str [H]: evaluated heads, e.g. POOL, FC (AGW) or FC, FC_att (DDAG)
``query_feat_<head>``             float32 [Nq, D], L2-normalised
``gallery_feat_<head>``           float32 [Ng, D]: the DISTINCT gallery images (union over trials)
``query_ids``, ``gallery_ids``    int64 [Nq], [Ng]
``query_cams``, ``gallery_cams``  int64; RegDB (no cameras): the modality code, 1 RGB 2 IR
``query_modality``, ...           str: 'rgb' or 'ir' per image (``gallery_modality`` too; files
                                  of older versions say 'visible' / 'infrared' and read as these)
``query_paths``, ``gallery_paths``  str
``trial_index``                   int64 [T, G]: each trial's gallery as indices into the gallery
                                  arrays (RegDB: one row, all gallery items)
``dataset``                       0-d str: sysu | regdb | llcm
``mode``, ``checkpoint``          0-d str, e.g. 'all' / 'visible_to_thermal'; the checkpoint path
``label``                         0-d str: short name for plots (default: checkpoint file stem)
================================  ====================================================
"""
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import datasets
import eval_metrics
from cli import UserError

__all__ = ["FeatureFile", "save_features", "load_features", "evaluate"]

MODALITIES = ("rgb", "ir")
_OLD_NAMES = {"visible": "rgb", "infrared": "ir"}   # our files before the one pair of names
_PER_IMAGE = ("ids", "cams", "modality", "paths")
_SCALARS = ("dataset", "mode", "checkpoint", "label")


@dataclass
class FeatureFile:
    """A loaded feature file; ``query``/``gallery`` feature dicts are keyed by head."""
    path: str
    heads: list
    query_feats: dict
    gallery_feats: dict
    query_ids: np.ndarray
    gallery_ids: np.ndarray
    query_cams: np.ndarray
    gallery_cams: np.ndarray
    query_modality: np.ndarray
    gallery_modality: np.ndarray
    query_paths: np.ndarray
    gallery_paths: np.ndarray
    trial_index: np.ndarray
    dataset: str
    mode: str
    checkpoint: str
    label: str


def _check(arrays, where, problem="not a valid feature file"):
    """The arrays of a feature file (name -> array) -> FeatureFile, or ONE UserError."""
    def fail(msg):
        raise UserError(f"{where}: {problem} ({msg}; see features.py)")

    if "heads" not in arrays:
        fail("no 'heads' array")
    heads = arrays["heads"]
    if heads.ndim != 1 or heads.dtype.kind != "U" or len(heads) == 0 or \
            len(set(heads.tolist())) != len(heads):
        fail("'heads' must be a non-empty 1-D array of distinct strings")
    heads = heads.tolist()
    required = [f"{side}_{what}" for side in ("query", "gallery") for what in _PER_IMAGE] + \
        [f"{side}_feat_{h}" for h in heads for side in ("query", "gallery")] + \
        ["trial_index", *_SCALARS]
    missing = [k for k in required if k not in arrays]
    if missing:
        fail(f"missing {', '.join(missing)}")
    out = {"path": where, "heads": heads, "query_feats": {}, "gallery_feats": {}}
    for side in ("query", "gallery"):
        n = len(arrays[f"{side}_ids"])
        for what, kind in zip(_PER_IMAGE, ("i", "i", "U", "U")):
            a = arrays[f"{side}_{what}"]
            if a.ndim != 1 or len(a) != n or (n and a.dtype.kind not in ("iu" if kind == "i" else "U")):
                fail(f"{side}_{what} must be 1-D {'integers' if kind == 'i' else 'strings'} of "
                     f"length {n}, got {a.dtype} {a.shape}")
            out[f"{side}_{what}"] = a.astype(np.int64) if kind == "i" else a
        out[f"{side}_modality"] = np.array([_OLD_NAMES.get(m, m) for m in out[f"{side}_modality"].tolist()],
                                           dtype=str)
        bad = set(out[f"{side}_modality"].tolist()) - set(MODALITIES)
        if bad:
            fail(f"{side}_modality holds {sorted(bad)[:3]}, expected {' / '.join(MODALITIES)}")
        for h in heads:
            f = arrays[f"{side}_feat_{h}"]
            if f.ndim != 2 or len(f) != n or f.dtype.kind != "f":
                fail(f"{side}_feat_{h} must be float [{n}, D], got {f.dtype} {f.shape}")
            out[f"{side}_feats"][h] = f
    for h in heads:
        if out["query_feats"][h].shape[1] != out["gallery_feats"][h].shape[1]:
            fail(f"query and gallery features of {h} differ in width")
    ti = arrays["trial_index"]
    ng = len(out["gallery_ids"])
    if ti.ndim != 2 or len(ti) == 0 or ti.dtype.kind not in "iu" or \
            (ti.size and (ti.min() < 0 or ti.max() >= ng)):
        fail(f"trial_index must be integers [T >= 1, G] indexing the {ng} gallery items, got "
             f"{ti.dtype} {ti.shape}")
    out["trial_index"] = ti.astype(np.int64)
    for k in _SCALARS:
        a = arrays[k]
        if a.ndim != 0 or a.dtype.kind != "U":
            fail(f"{k} must be a 0-d string array")
        out[k] = str(a)
    if out["dataset"] not in datasets.NAMES:
        fail(f"dataset is {out['dataset']!r}, expected one of {', '.join(datasets.NAMES)}")
    return FeatureFile(**out)


def save_features(path, heads, q_feats, g_feats, q_ids, g_ids, q_cams, g_cams, q_modality,
                  g_modality, q_paths, g_paths, trial_index, dataset, mode, checkpoint,
                  label=None):
    """Write one feature file (format: module docstring) and return its path.

    ``q_feats``/``g_feats``: one array per head, in ``heads`` order (or a dict by head).
    ``q_modality``/``g_modality``: a string per image, or one string for all images.
    ``trial_index``: a list of per-trial index arrays of equal length. ``label`` defaults to
    the checkpoint's file stem. The result is checked as :func:`load_features` checks it.
    """
    heads = [str(h) for h in heads]
    if isinstance(q_feats, dict):
        q_feats, g_feats = [q_feats[h] for h in heads], [g_feats[h] for h in heads]
    if len(q_feats) != len(heads) or len(g_feats) != len(heads):
        raise ValueError(f"save_features: {len(heads)} heads but {len(q_feats)} query and "
                         f"{len(g_feats)} gallery feature arrays")
    nq, ng = len(q_ids), len(g_ids)

    def strings(x, n):
        return np.full(n, x) if isinstance(x, str) else \
            np.asarray([str(v) for v in x], dtype=str)

    arrays = {"heads": np.asarray(heads, dtype=str)}
    for h, qf, gf in zip(heads, q_feats, g_feats):
        arrays[f"query_feat_{h}"] = np.asarray(qf, dtype=np.float32)
        arrays[f"gallery_feat_{h}"] = np.asarray(gf, dtype=np.float32)
    for side, n, ids, cams, modality, paths in (("query", nq, q_ids, q_cams, q_modality, q_paths),
                                                ("gallery", ng, g_ids, g_cams, g_modality, g_paths)):
        arrays[f"{side}_ids"] = np.asarray(ids, dtype=np.int64).reshape(-1)
        arrays[f"{side}_cams"] = np.asarray(cams, dtype=np.int64).reshape(-1)
        arrays[f"{side}_modality"] = strings(modality, n)
        arrays[f"{side}_paths"] = strings(paths, n)
    arrays["trial_index"] = np.asarray(trial_index, dtype=np.int64).reshape(len(trial_index), -1)
    label = label if label is not None else Path(str(checkpoint)).stem
    for k, v in zip(_SCALARS, (dataset, mode, checkpoint, label)):
        arrays[k] = np.asarray(str(v), dtype=str)
    path = Path(path)
    path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
    _check(arrays, str(path), "refusing to write an invalid feature file")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_features(path):
    """Read and check a feature file -> :class:`FeatureFile`; UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such feature file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":     # every .npz is a zip archive
            raise UserError(f"{path}: not a valid feature file (not an .npz archive; "
                            "written by features.save_features)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # cut, pickled objects
        msg = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise UserError(f"{path}: not a valid feature file (unreadable .npz: {msg})")
    return _check(arrays, str(path))


def evaluate(ff, head=None, rerank=False, **rerank_args):
    """Metrics of ``head`` (default: the last head) recomputed from a loaded file, exactly
    as the test scripts compute them (the benchmark's evaluator for the file's protocol
    variant, ``datasets.Benchmark.scorer``). Returns ``(per_trial, mean)``: a list of
    ``(cmc, mAP, mINP)`` per trial and their mean (``eval_metrics.format_metrics`` prints
    one). ``rerank=True``: each trial's distances are k-reciprocal re-ranked first
    (``rerank_args``: k1, k2, lambda_value), as ``--rerank`` does."""
    head = ff.heads[-1] if head is None else head
    if head not in ff.heads:
        raise UserError(f"{ff.path}: no head {head!r} (it has {', '.join(ff.heads)})")
    score, swap = datasets.get(ff.dataset).scorer(ff.mode)
    return eval_metrics.evaluate_trials(ff.query_feats[head], ff.query_ids, ff.query_cams,
                                        ff.gallery_feats[head], ff.gallery_ids, ff.gallery_cams,
                                        ff.trial_index, score, swap=swap,
                                        rerank_args=rerank_args if rerank else None)
