"""Pseudo-labels (CheXFusion's lever): a trained run's predictions of ITS labels (e.g. the 30
PadChest labels) on every image of another cache (a public dataset's, cxrlt/data/external.py),
written as soft labels: a prediction CSV (`ImageID,<labels>`, probabilities in [0, 1]; the format of
cxrlt.data.tables.read_predictions). A config trains on them beside its real labels with
`pseudo_cache` (that cache), `pseudo_labels` (the CSV) and `pseudo_weight` (the weight of a soft
label in the loss relative to a real one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrlt.core.errors import InputError
from cxrlt.data.tables import read_predictions


def predict_soft_labels(checkpoint, cache_dir, device, batch_size: int = 64, workers: int = 0,
                        tta: str = "none") -> pd.DataFrame:
    """-> DataFrame[ImageID, <the checkpoint's labels>] of probabilities for every row of the cache."""
    from cxrlt.data.cache import open_cache
    from cxrlt.data.dataset import CacheDataset, make_loader
    from cxrlt.post.inference import check_cache_size, load_trained, predict_tta

    model, ck = load_trained(checkpoint, device)
    labels = list(ck["labels"])
    cache = open_cache(cache_dir)
    check_cache_size(ck, cache, checkpoint)
    rows = cache.rows()
    ds = CacheDataset(f"{cache_dir}/images.npy", rows, num_classes=len(labels))
    loader = make_loader(ds, batch_size, workers=workers)
    got, probs = predict_tta(model, loader, device, tta, "prob", amp=False, desc="pseudo-label")
    if not np.array_equal(got, rows):
        raise RuntimeError("predictions came back in another order than the rows")
    df = pd.DataFrame(np.clip(probs, 0.0, 1.0), columns=labels)
    df.insert(0, "ImageID", cache.ids(rows))
    return df


def read_soft_labels(path, cache, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (cache rows (n,), soft labels float32 (n, C) in `labels` order) of a pseudo-label CSV whose
    images are all in `cache` (an ImageID the cache lacks is an InputError naming the file)."""
    pred = read_predictions(path, labels=list(labels))
    ids = cache.ids(cache.rows())
    row_of = pd.Series(cache.rows(), index=pd.Index(ids))
    missing = ~pred.index.isin(row_of.index)
    if missing.any():
        raise InputError(f"{path}: {int(missing.sum())} ImageID(s) are not in the cache {cache.path}, "
                         f"e.g. {pred.index[missing][0]!r} (pseudo_labels must come from pseudo_cache)")
    rows = row_of.loc[pred.index].to_numpy(dtype=np.int64)
    return rows, pred.to_numpy(dtype=np.float32)
