"""Batch scoring speed of the authors' three released models (mlsp score --model --images).

For each model's configuration -- irv2 wide + pool3fc on the whole image; irv2 narrow +
single3fc on the whole image; irv2 narrow + single3fc on the 18 views of the aug model -- a
random-weight irv2 and a head of the exact shape (63,828,481 and 37,044,737 parameters; random
weights cost the same FLOPs) score a folder of generated JPEGs of AVA-like sizes through the
code behind the command (:func:`heads.score.scoring.score_files` with
:class:`heads.score.released.PretrainedScorer`: decoding ahead in 2 threads, the model's
views, the backbone, the head). The backbone and head are built and run once on one image
before timing. Writes ``bench/results/pretrained-<time>-<device>.json``.

    python bench/bench_pretrained.py              # 8 images for the one-view models, 3 for crops18
    python bench/bench_pretrained.py --quick      # 2 and 1 smaller images: checks the script
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import Phase, log, new_record, write_record  # noqa: E402
from pictures import mixed_sizes, write_set  # noqa: E402

#: name -> (pooling, head, views, parameters of the released head)
CONFIGS = {
    "ava-mlsp-irv2-wide": ("wide", "pool3fc", "full", 63_828_481),
    "ava-mlsp-irv2-narrow": ("narrow", "single3fc", "full", 37_044_737),
    "ava-mlsp-irv2-narrow-aug": ("narrow", "single3fc", "crops18", 37_044_737),
}


def measure(name: str, extractor, folder: str, paths: list, warm_path: str) -> dict:
    from heads.models import build_head
    from heads.score.released import PretrainedScorer
    from heads.score.scoring import score_files
    from mlsp.images.readahead import DECODE_WORKERS, LocalRunner

    pooling, head, views, params = CONFIGS[name]
    model = build_head(head, extractor.config.spec.channels, pooling=pooling)
    if model.count_params() != params:
        raise SystemExit(f"{name}: head of {model.count_params():,} parameters, the released one has {params:,}")
    scorer = PretrainedScorer(model, extractor, name, views, None)
    runner = LocalRunner(scorer, DECODE_WORKERS)
    with Phase() as warm:
        score_files(runner, [warm_path])
    with Phase() as phase:
        frame, errors = score_files(runner, folder)
    if errors or len(frame) != len(paths):
        raise SystemExit(f"{name}: {len(errors)} images failed: {errors[:2]}")
    record = phase.record()
    log(f"{name}: {len(paths)} images in {record['wall_s']:.1f} s, other processes "
        f"{record['other_cores']} cores busy")
    return {"pooling": pooling, "head": head, "views": views, "n_views": scorer.procedure.n_views,
            "head_params": params, "images": len(paths), "warm_up": warm.record(), **record,
            "images_per_s": round(len(paths) / record["wall_s"], 4),
            "cpu_s_per_image": round(record["cpu_s"] / len(paths), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images for the one-view models")
    parser.add_argument("--crops-images", type=int, default=3, help="images for the 18-view model")
    parser.add_argument("--quick", action="store_true", help="2 and 1 small images: checks the script")
    parser.add_argument("--models", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    if args.quick:
        args.images, args.crops_images = 2, 1
    lo, hi = (300, 400) if args.quick else (300, 800)
    record = new_record("pretrained", vars(args))
    from mlsp.extraction.job import ExtractConfig, FeatureExtractor
    from common import device_info

    record["device"] = device_info()
    extractors = {}
    with tempfile.TemporaryDirectory(prefix="mlsp-bench-pretrained-") as tmp:
        for name in args.models.split(","):
            pooling, _, views, _ = CONFIGS[name]
            n = args.crops_images if views == "crops18" else args.images
            folder = os.path.join(tmp, name)
            paths = write_set(folder, mixed_sizes(n, lo, hi, seed=1), seed=1)
            warm = write_set(os.path.join(tmp, "warm-" + name), [(lo, lo)], seed=2)[0]
            if pooling not in extractors:
                log(f"building irv2 {pooling} (random weights)")
                extractors[pooling] = FeatureExtractor(ExtractConfig(net="irv2", pooling=pooling, augment=False,
                                                                     weights="random:0"))
            record["figures"][name] = measure(name, extractors[pooling], folder, paths, warm)
    record["notes"].append("random weights (the same FLOPs as ImageNet's); JPEG sizes uniform in "
                           f"{lo}-{hi} px a side (AVA: mean 629x497, at most 800); float32; 2 decode threads")
    log(f"wrote {write_record(record)}")


if __name__ == "__main__":
    main()
