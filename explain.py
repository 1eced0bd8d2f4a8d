#!/usr/bin/env python
"""Class activation maps of a trained run: where the model finds each label, as PNG panels.

    python explain.py --checkpoint runs/x/crt/model.pt --cache data/cache/x_512/train --out runs/x/explain
        [--images ID ...] [--n 8] [--labels L ...] [--top 3] [--method auto|gradcam|attention]
        [--layer NAME] [--device auto]
    python explain.py --checkpoint runs/x/model.pt --files my.png other.png --out explain/ [--size 512]
    python explain.py ... --cache C/train --boxes data/demo/boxes.csv --image-dir data/demo/images

With --boxes (ImageID,label,x0,y0,x1,y1 in pixels of the original files in --image-dir) it also plays
the pointing game over the run's whole val fold: how often the map's peak of a correctly detected
finding falls inside its box, against a random point (pointing.json).

Images: the given ImageIDs of the cache (train or test rows), else the first --n labelled images of
the run's val fold; or image files (--files), decoded like the cache at --size (default: the
cache's size, else the size the checkpoint was trained at). Labels: the top --top predicted
ones per image, or the --labels given. Method: Grad-CAM for linear and cosine heads, CSRA's
class-specific attention for a CSRA head (auto); --layer NAME takes Grad-CAM on a backbone module
instead (e.g. layer3: finer maps). Outputs and methods: cxrlt/explain.py.
"""

import argparse

from cxrlt.core.cli import main_wrapper, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model.pt of a run (or of its crt/ folder)")
    ap.add_argument("--cache", help="the run's train cache (or a test cache): images by ImageID, and their labels")
    ap.add_argument("--images", nargs="+", metavar="IMAGE_ID", help="ImageIDs of the cache to explain")
    ap.add_argument("--n", type=positive_int, default=8, help="without --images: this many labelled val-fold images")
    ap.add_argument("--files", nargs="+", metavar="FILE", help="image files to explain instead of cache images")
    ap.add_argument("--size", type=positive_int, help="--files: the square side to resize to")
    ap.add_argument("--labels", nargs="+", metavar="LABEL", help="explain these labels (default: the top predicted)")
    ap.add_argument("--top", type=positive_int, default=3, help="without --labels: this many top-predicted labels per image")
    ap.add_argument("--method", default="auto", help="auto | gradcam | attention (CSRA heads)")
    ap.add_argument("--layer", help="Grad-CAM on this backbone module's output (e.g. layer3, stages.2)")
    ap.add_argument("--boxes", help="boxes of the findings (ImageID,label,x0,y0,x1,y1): pointing game on the val fold")
    ap.add_argument("--image-dir", help="--boxes: the original images (their sizes map the boxes onto the cache)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--out", required=True, help="output folder for the panels and explain.csv")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from cxrlt.core.errors import InputError

    if not a.files and not a.cache:
        raise InputError("give --cache (images by ImageID / the val fold) or --files")
    if a.n < 1 or a.top < 1:
        raise InputError("--n and --top must be at least 1")
    from cxrlt.training.distributed import pick_device
    from cxrlt.explain import explain_images, images_from_cache, images_from_files
    from cxrlt.post.inference import load_trained

    device = pick_device(a.device)
    model, ck = load_trained(a.checkpoint, device)
    truth = None
    if a.files:
        from cxrlt.data.cache import open_cache

        size = a.size or (open_cache(a.cache).size if a.cache else ck.get("image_size"))
        if not size:
            raise InputError(f"--files: give --size (the checkpoint {a.checkpoint} does not record its image size)")
        images, ids = images_from_files(a.files, int(size))
    else:
        images, ids, truth, cache_labels = images_from_cache(a.cache, a.images, a.n, ck["config"]["val_fold"])
        if cache_labels != list(ck["labels"]):
            raise InputError(f"{a.cache}: cache labels differ from the checkpoint's ({a.checkpoint})")
    rows = explain_images(model, ck, images, ids, truth, a.out, a.labels, a.top, a.method, a.layer, device)
    print(f"wrote {len(ids)} panel(s) and explain.csv ({len(rows)} maps) to {a.out}")
    if a.boxes:
        pointing(a, model, ck, device)
    return 0


def pointing(a, model, ck, device) -> None:
    from pathlib import Path

    from cxrlt.core.errors import InputError
    from cxrlt.data.cache_build import find_images
    from cxrlt.explain import image_size, images_from_cache, pointing_game, read_boxes
    from cxrlt.core.fileio import write_json

    if not a.cache or not a.image_dir:
        raise InputError("--boxes needs --cache (the run's train cache) and --image-dir (the original images)")
    boxes = read_boxes(a.boxes, list(ck["labels"]))
    images, ids, y, _ = images_from_cache(a.cache, None, None, ck["config"]["val_fold"])
    wanted = set(boxes["ImageID"]) & set(ids)
    sizes = {}
    wanted = sorted(wanted)
    for i, f in zip(wanted, find_images(a.image_dir, wanted)):  # subfolders too (NIH's images_001/images/)
        if f is None:
            raise InputError(f"{Path(a.image_dir) / i}: not found (--image-dir must hold the images the boxes "
                             f"refer to)")
        sizes[i] = image_size(f)
    res = pointing_game(model, ck, images, ids, y, boxes, sizes, a.method, a.layer, device)
    write_json(Path(a.out) / "pointing.json", res)
    print(f"pointing game on {res['n']} correctly detected findings with a box: peak inside the box "
          f"{res['hit_rate']:.1%}, a random point {res['random_rate']:.1%} (best possible at the map's "
          f"{res['map_size']} cells: {res['ceiling']:.1%}) -> {a.out}/pointing.json")


if __name__ == "__main__":
    main_wrapper(main)
