"""The naive way as a whole process: what a user of Keras writes to extract MLSP features
without mlsp (the authors' way): build the backbone with its taps and pooling, then for every
image decode it in the main thread and call ``model.predict`` once per view, writing each image's
features to HDF5.

    python bench/naive_process.py FOLDER OUT.h5 [--net iv3] [--pooling narrow] [--weights random:0]

The backbone, taps, pooling and decoding are mlsp's (so both ways do the same arithmetic on the
same pixels); nothing of mlsp's extraction is used: no folded batch norms, no traced graph, no
decode-ahead threads, no batching of the views. Run by ``whole_process.py``, which sets
``TF_ENABLE_ONEDNN_OPTS`` to TensorFlow's own default of the machine (mlsp changes it, see
FINDINGS.md, "AVX2"), so this is the process a user of plain TensorFlow gets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--net", default="iv3")
    p.add_argument("--pooling", default="narrow", choices=["narrow", "wide"])
    p.add_argument("--weights", default="random:0")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    import h5py
    import keras
    import numpy as np

    from mlsp.backbone import weights as backbone_weights, nets as backbones
    from mlsp.images import decode as images
    from mlsp.extraction.job import POOLINGS
    from mlsp.backbone.pooling import MultiLevelPooling

    spec = backbones.BACKBONES.get(args.net)
    backbone, _ = backbone_weights.build_backbone(spec, backbone_weights.WeightsSource.parse(args.weights))
    taps = backbones.tap_outputs(spec, backbone)
    model = keras.Model(backbone.input, MultiLevelPooling(grid=POOLINGS[args.pooling])(taps))
    paths = sorted(os.path.join(args.folder, n) for n in os.listdir(args.folder))
    t_built = time.perf_counter()
    with h5py.File(args.out, "w") as f:
        for i, path in enumerate(paths):
            views = images.make_views(images.decode_image(path, 1024), True)
            batches = [np.asarray(spec.preprocess(v[None].astype(np.float32))) for v in views]
            feats = [model.predict(x, verbose=0)[0] for x in batches]
            f.create_dataset(f"{i:06d}", data=np.stack(feats).astype(np.float16))
    t_end = time.perf_counter()
    print(f"naive: build {t_built - t0:.2f} s, images {t_end - t_built:.2f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
