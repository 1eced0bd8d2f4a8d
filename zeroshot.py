#!/usr/bin/env python3
"""Zero-shot finding scores from a CLIP-style model and a prompt file (CXR-LT 2026 Task 2).

    python zeroshot.py --cache data/cache/NAME --model hf-hub:yyupenn/whyxrayclip --out runs/zs/pred_test.csv
        [--weights FILE] [--prompts prompts/task2.yaml] [--labels-file prompts/cxrlt2026_task2_labels.txt]
        [--split test|train|all] [--method cosine|softmax] [--pool mean|max|embedding]
        [--temperature T] [--center median|zero] [--embeddings DIR] [--device auto] [--batch-size 64]

--model: `hf-hub:ORG/REPO` (needs network or the Hugging Face cache), `local-dir:FOLDER` or FOLDER
(a downloaded open_clip model: open_clip_config.json + weights), or an open_clip config name
(`ViT-L-14`) with --weights FILE. Output: ImageID + the labels of --labels-file in that order,
one row per scored cache row (cache order), probabilities in [0, 1]; beside it `<out>.json`
records the inputs and choices. `ensemble.py combine --test OUT --test-list LIST` turns it into a
submission in test-list order. Image embeddings are cached in --embeddings (default: an
`embeddings` folder beside --out), so another prompt file or method costs seconds.
Scoring and file formats: see cxrlt/zeroshot/scoring.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cxrlt.core.cli import main_wrapper, nonnegative_int, positive_int

ROOT = Path(__file__).resolve().parent
DEFAULT_PROMPTS = ROOT / "prompts" / "task2.yaml"
DEFAULT_LABELS = ROOT / "prompts" / "cxrlt2026_task2_labels.txt"


def parse_args(argv=None) -> argparse.Namespace:
    from cxrlt.zeroshot.scoring import CENTERS, METHODS, POOLS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="image cache folder (preprocess.py)")
    ap.add_argument("--split", choices=("test", "train", "all"), default="test", help="cache rows to score")
    ap.add_argument("--model", required=True, help="hf-hub:ORG/REPO, local-dir:FOLDER, FOLDER, or a config name")
    ap.add_argument("--weights", help="local weights file for a config-name --model")
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt file (YAML)")
    ap.add_argument("--labels-file", default=str(DEFAULT_LABELS), help="label names, one a line, output order")
    ap.add_argument("--method", choices=METHODS, default="cosine")
    ap.add_argument("--pool", choices=POOLS, default="mean", help="how a finding's prompts are combined")
    ap.add_argument("--temperature", type=float, help="T in sigmoid(s / T); default 1 / the model's logit scale")
    ap.add_argument("--center", choices=CENTERS, default="median", help="--method cosine: subtract the "
                    "per-finding median similarity (default) or nothing")
    ap.add_argument("--embeddings", help="image-embedding cache folder (default: OUT's folder/embeddings)")
    ap.add_argument("--out", required=True, help="prediction CSV to write")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--workers", type=nonnegative_int, default=2, help="data-loader processes (0: in-process)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from cxrlt.data.cache import open_cache
    from cxrlt.core.errors import InputError
    from cxrlt.core.fileio import write_csv, write_json
    from cxrlt.core.labels import read_labels_file
    from cxrlt.core.hashing import file_key
    from cxrlt.zeroshot.scoring import load_encoder, load_prompts, score_cache

    t0 = time.time()
    if a.batch_size < 1 or a.workers < 0:
        raise InputError("--batch-size must be >= 1 and --workers >= 0")
    if a.temperature is not None and not a.temperature > 0:
        raise InputError(f"--temperature {a.temperature}: must be > 0")
    labels = read_labels_file(a.labels_file)
    prompts = load_prompts(a.prompts, labels, need_negative=a.method == "softmax")  # before the slow load
    cache = open_cache(a.cache)
    encoder = load_encoder(a.model, a.weights, a.device)
    emb_dir = a.embeddings or str(Path(a.out).parent / "embeddings")
    df, info = score_cache(encoder, cache, a.split, prompts, emb_dir, method=a.method, pool=a.pool,
                           temperature=a.temperature, center=a.center, batch_size=a.batch_size,
                           workers=a.workers)
    write_csv(a.out, df)
    info.update(model=a.model, weights=a.weights, cache=str(a.cache), labels=labels, prompts_file=str(a.prompts),
                prompts_key=file_key(a.prompts), seconds=round(time.time() - t0, 2))
    write_json(f"{a.out}.json", info)
    e = info["embeddings"]
    print(f"image embeddings: {e['status']} {e['path']}")
    print(f"wrote {a.out}: {info['n']} rows x {len(labels)} labels ({a.method}, pool {a.pool}, "
          f"T {info['temperature']:.4g}) in {info['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    main_wrapper(main)
