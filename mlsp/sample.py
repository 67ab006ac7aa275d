"""A small built-in dataset of real photographs with controlled quality, to try mlsp end to end.

:func:`build_sample` writes, from photographs that ship inside scikit-image (each one public
domain or CC0, see :data:`SOURCES`), a folder laid out like AVA:

- ``images/``: ``100001.jpg`` ... : crops of the source photos at seeded random positions and
  scales, 200-700 px per side, each with one controlled degradation (Gaussian blur, Gaussian
  noise, JPEG compression, contrast reduction, or none) at a seeded level. Mostly JPEG, plus
  one file in each other format the extractor reads (``.jpeg``, PNG, 16-bit PNG, PNG with an
  alpha channel, WEBP, BMP, TIFF), one grayscale JPEG and one JPEG with an EXIF orientation tag;
- ``AVA.txt``: vote counts in AVA's format, drawn around a hidden true quality that falls with
  the degradation level, plus a few labels whose images do not exist (as in real AVA);
- ``generic_test.jpgl``: about 20% of the image ids (and one id without an image);
- ``truth.csv``: the hidden truth of every image (source, degradation, level, true quality).

Everything is a function of the seed: two builds with the same seed give the same bytes in
``AVA.txt`` and the same pixels. The source files are read straight from scikit-image's
package folder, so nothing is ever downloaded (``skimage.data``'s loaders would try to
download files that are not bundled).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
from typing import NamedTuple

import cv2
import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

# (skimage.data function, bundled file, credit and licence as scikit-image states them).
# Only files that ship with scikit-image and whose licence it states as public domain, CC0 or
# "no known copyright restrictions". (moon and the Middlebury motorcycles have no such statement;
# page and text are narrower than 200 px.)
SOURCES = (
    ("astronaut", "astronaut.png", "Eileen Collins, NASA; public domain"),
    ("chelsea", "chelsea.png", "Stefan van der Walt; CC0"),
    ("coffee", "coffee.png", "Rachel Michetti, Pikolo Espresso Bar; CC0"),
    ("rocket", "rocket.jpg", "DSCOVR launch on Falcon 9, SpaceX; public domain"),
    ("hubble_deep_field", "hubble_deep_field.jpg", "NASA; public domain"),
    ("retina", "retina.jpg", "Fundus photograph, Wikimedia Commons; CC0"),
    ("immunohistochemistry", "ihc.png", "no known copyright restrictions"),
    ("camera", "camera.png", "Lav Varshney; CC0"),
    ("coins", "coins.png", "Greek coins from Pompeii; no known copyright restrictions"),
    ("brick", "brick.png", "CC0Textures Bricks25; CC0"),
    ("grass", "grass.png", "CC0Textures; CC0"),
    ("gravel", "gravel.png", "CC0Textures Gravel04; CC0"),
)

DEGRADATIONS = ("none", "blur", "noise", "jpeg", "contrast")
FIRST_ID = 100001
MIN_SIDE, MAX_SIDE = 200, 700
TEST_FRACTION = 0.2
N_MISSING = 3  # labels whose images do not exist
#: Images in the sample dataset (`mlsp sample --images`).
SAMPLE_IMAGES = 64
EXIF_ORIENTATION = 0x0112

# One file of each special kind, placed at seeded positions; the rest are RGB JPEG.
SPECIAL_FORMATS = (
    "png_rgba", "png16", "gray_jpeg", "exif_jpeg", "png", "webp", "bmp", "tiff", "jpeg_ext",
)
_EXTENSION = {
    "jpeg": ".jpg", "gray_jpeg": ".jpg", "exif_jpeg": ".jpg", "jpeg_ext": ".jpeg",
    "png": ".png", "png_rgba": ".png", "png16": ".png",
    "webp": ".webp", "bmp": ".bmp", "tiff": ".tif",
}
_SAMPLE_FILE = re.compile(r"^\d{6}\.(jpg|jpeg|png|webp|bmp|tif)$")


class SampleImage(NamedTuple):
    """The hidden truth of one sample image."""

    id: str
    source: str
    degradation: str  # one of DEGRADATIONS
    level: float  # 0 (none) .. 1 (strongest)
    true_quality: float  # 1..10, what the votes are drawn around


@dataclasses.dataclass
class SampleInfo:
    """What :func:`build_sample` wrote.

    ``images`` holds (id, source, degradation, level, true_quality) per image, in id order;
    ``files`` maps each id to its file name in ``images_dir``; ``kinds`` maps each id to its
    file kind (``jpeg``, ``png_rgba``, ``png16``, ``gray_jpeg``, ``exif_jpeg``, ...);
    ``sizes`` maps each id to (height, width) as displayed (after EXIF orientation).
    """

    images_dir: str
    labels_path: str
    test_list_path: str
    truth_path: str
    n_images: int
    images: list[SampleImage]
    files: dict[str, str]
    kinds: dict[str, str]
    sizes: dict[str, tuple[int, int]]
    test_ids: list[str]
    labels_without_images: list[str]
    sources: list[str]


def skimage_data_dir() -> str:
    """The folder of scikit-image's bundled sample files (scikit-image is not imported)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the sample dataset is built from photographs shipped with scikit-image, which is "
            "not installed: pip install scikit-image (or: pip install 'mlsp[test]')"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def load_source(name: str) -> np.ndarray:
    """One source photograph as (H, W, 3) uint8 RGB (grayscale sources replicated)."""
    files = {n: f for n, f, _ in SOURCES}
    if name not in files:
        raise ConfigError(f"unknown sample source {name!r}; known: {', '.join(files)}")
    path = os.path.join(skimage_data_dir(), files[name])
    img = cv2.imread(path, cv2.IMREAD_COLOR)  # also turns grayscale into 3 channels
    if img is None:
        raise ConfigError(f"scikit-image's bundled file {path} is missing or unreadable")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _plan_size(rng: np.random.Generator, src_h: int, src_w: int, max_side: int | None):
    """A random crop (y, x, h, w) of the source and the output size (h, w) it is resized to."""
    long_side = int(rng.integers(300, MAX_SIDE + 1))
    aspect = float(rng.uniform(0.6, 1.0))
    portrait = bool(rng.random() < 0.3)
    scale = float(rng.uniform(0.6, 1.0))
    th, tw = (long_side, long_side * aspect) if portrait else (long_side * aspect, long_side)
    fit = min(src_h / th, src_w / tw) * scale
    ch = int(np.clip(round(th * fit), min(MIN_SIDE, src_h), src_h))
    cw = int(np.clip(round(tw * fit), min(MIN_SIDE, src_w), src_w))
    y = int(rng.integers(0, src_h - ch + 1))
    x = int(rng.integers(0, src_w - cw + 1))
    ratio = min(1.0, long_side / max(ch, cw))
    ratio = min(1.0, max(ratio, MIN_SIDE / min(ch, cw)))  # never below 200 px, never upscaled
    if max_side:
        ratio = min(ratio, max_side / max(ch, cw))
    out = (max(1, round(ch * ratio)), max(1, round(cw * ratio)))
    return (y, x, ch, cw), out


def _jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def jpeg_quality(level: float) -> int:
    """JPEG quality of the ``jpeg`` degradation at ``level``: 55 at 0 down to 5 at 1."""
    return int(round(55 - 50 * level))


def degrade(img: np.ndarray, degradation: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """Apply one degradation at ``level`` in [0, 1] to an RGB uint8 image.

    blur: Gaussian, sigma 0.4 + 4.6 * level px; noise: Gaussian, sigma 4 + 36 * level (of 255);
    jpeg: compression at :func:`jpeg_quality`; contrast: pulled toward the mean grey by a
    factor 1 - 0.75 * level.
    """
    if degradation == "none" or level <= 0:
        return img
    if degradation == "blur":
        return cv2.GaussianBlur(img, (0, 0), sigmaX=0.4 + 4.6 * level)
    if degradation == "noise":
        noise = rng.normal(0.0, 4.0 + 36.0 * level, size=img.shape)
        return np.clip(img + noise + 0.5, 0, 255).astype(np.uint8)
    if degradation == "jpeg":
        return _jpeg_roundtrip(img, jpeg_quality(level))
    if degradation == "contrast":
        mean = img.reshape(-1, 3).mean(axis=0)
        out = mean + (img - mean) * (1.0 - 0.75 * level)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)
    raise ConfigError(f"unknown degradation {degradation!r}; known: {', '.join(DEGRADATIONS)}")


def true_quality(level: float, source_offset: float) -> float:
    """The hidden quality: 7.5 for a clean photo, 4.5 less at the strongest degradation."""
    return float(np.clip(7.5 + source_offset - 4.5 * level, 1.0, 10.0))


def draw_votes(rng: np.random.Generator, quality: float) -> np.ndarray:
    """10-bin vote counts of 100-250 voters, from a discretised normal around ``quality``."""
    n_voters = int(rng.integers(100, 251))
    scores = np.arange(1, 11)
    p = np.exp(-0.5 * ((scores - quality) / 1.4) ** 2)
    return rng.multinomial(n_voters, p / p.sum())


def _alpha_mask(h: int, w: int) -> np.ndarray:
    """Opaque in the middle, fading to transparent in the corners."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2))
    return (np.clip(1.6 - r * 1.2, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _write_image(path: str, img: np.ndarray, kind: str, jpeg_q: int) -> tuple[int, int]:
    """Write ``img`` (RGB uint8, as displayed) in the file kind; returns its displayed size."""
    from PIL import Image

    h, w = img.shape[:2]
    if kind == "png16":
        # 16-bit RGB: Pillow cannot write it, OpenCV can (BGR order). x257 maps 255 -> 65535.
        cv2.imwrite(path, img[..., ::-1].astype(np.uint16) * 257)
        return h, w
    if kind == "png_rgba":
        Image.fromarray(np.dstack([img, _alpha_mask(h, w)]), "RGBA").save(path, optimize=False)
    elif kind == "gray_jpeg":
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        Image.fromarray(gray, "L").save(path, quality=jpeg_q)
    elif kind == "exif_jpeg":
        # Orientation 6: a viewer turns the stored pixels 90 degrees clockwise, so store them
        # turned 90 degrees counter-clockwise and the photo shows upright.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        stored = np.ascontiguousarray(np.rot90(img, 1))
        Image.fromarray(stored, "RGB").save(path, quality=jpeg_q, exif=exif.tobytes())
    elif kind in ("jpeg", "jpeg_ext"):
        Image.fromarray(img, "RGB").save(path, quality=jpeg_q)
    elif kind == "png":
        Image.fromarray(img, "RGB").save(path)
    elif kind == "webp":
        Image.fromarray(img, "RGB").save(path, quality=90, method=4)
    elif kind == "bmp":
        Image.fromarray(img, "RGB").save(path)
    elif kind == "tiff":
        Image.fromarray(img, "RGB").save(path, compression="tiff_lzw")
    else:  # pragma: no cover - SPECIAL_FORMATS and _EXTENSION are kept in step
        raise ConfigError(f"unknown image kind {kind!r}")
    return h, w


def _clear_old_images(images_dir: str):
    """Remove the files of an earlier build (six-digit names) so none is left over."""
    removed = 0
    for name in os.listdir(images_dir):
        if _SAMPLE_FILE.match(name):
            os.remove(os.path.join(images_dir, name))
            removed += 1
        else:
            log.warning("%s: leaving %s, which is not a sample image", images_dir, name)
    if removed:
        log.info("%s: removed %d images of an earlier build", images_dir, removed)


def build_sample(out_dir, n_images: int = SAMPLE_IMAGES, seed: int = 0, max_side: int | None = None) -> SampleInfo:
    """Write the sample dataset into ``out_dir`` (see the module docstring); return what it holds.

    Args:
        out_dir: folder to write ``images/``, ``AVA.txt``, ``generic_test.jpgl``, ``truth.csv``.
            Images of an earlier build in ``images/`` are replaced.
        n_images: number of images (at least 1; the special file kinds need 9).
        seed: everything random (crops, degradations, levels, votes, test list) follows from it.
        max_side: if given, no image side exceeds it (the default gives 200-700 px per side).
    """
    if not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ConfigError(f"n_images must be a positive integer, got {n_images!r}")
    if max_side is not None and (not isinstance(max_side, (int, np.integer)) or max_side < 32):
        raise ConfigError(f"max_side must be None or an integer of at least 32, got {max_side!r}")
    n_images = int(n_images)
    out_dir = os.fspath(out_dir)
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    _clear_old_images(images_dir)

    seeds = np.random.SeedSequence(seed)
    plan_seed, *image_seeds = seeds.spawn(n_images + 1)
    rng = np.random.default_rng(plan_seed)
    plan = _Plan.draw(rng, n_images)
    cache: dict[str, np.ndarray] = {}
    images, files, sizes, votes = [], {}, {}, {}
    for k, image_id in enumerate(plan.image_ids):
        if plan.sources[k] not in cache:
            cache[plan.sources[k]] = load_source(plan.sources[k])
        image, files[image_id], sizes[image_id], votes[image_id] = _make_image(
            plan, k, rng=np.random.default_rng(image_seeds[k]), source=cache[plan.sources[k]],
            images_dir=images_dir, max_side=max_side)
        images.append(image)
    for image_id in plan.missing_ids:  # labels without images: votes around a typical photo
        votes[image_id] = draw_votes(rng, round(float(rng.uniform(4.0, 7.0)), 3))

    info = SampleInfo(
        images_dir=images_dir, labels_path=os.path.join(out_dir, "AVA.txt"),
        test_list_path=os.path.join(out_dir, "generic_test.jpgl"), truth_path=os.path.join(out_dir, "truth.csv"),
        n_images=n_images, images=images, files=files, kinds=dict(zip(plan.image_ids, plan.kinds)),
        sizes=sizes, test_ids=plan.test_ids, labels_without_images=plan.missing_ids,
        sources=sorted(set(plan.sources)),
    )
    _write_label_files(info, plan, votes)
    log.info("%s: %d sample images, %d labels without images, %d test ids",
             out_dir, n_images, len(plan.missing_ids), len(plan.test_ids))
    return info


@dataclasses.dataclass
class _Plan:
    """What a sample build draws before any image: the ids (some without image), each image's
    source, degradation and file kind, the sources' quality offsets and challenge ids, the test list."""

    all_ids: list[str]  # n_images + N_MISSING consecutive numbers
    image_ids: list[str]
    missing_ids: list[str]  # labels without images
    offsets: dict  # source -> true-quality offset
    sources: list[str]  # per image
    degradations: list[str]  # per image
    kinds: list[str]  # per image: "jpeg", or one of SPECIAL_FORMATS
    test_ids: list[str]
    challenges: dict  # source -> AVA challenge id

    @classmethod
    def draw(cls, rng: np.random.Generator, n_images: int) -> "_Plan":
        # Ids: n_images + N_MISSING consecutive numbers; N_MISSING of them get no image.
        all_ids = [str(FIRST_ID + k) for k in range(n_images + N_MISSING)]
        missing_pos = set(rng.choice(len(all_ids), size=N_MISSING, replace=False).tolist())
        image_ids = [i for k, i in enumerate(all_ids) if k not in missing_pos]
        missing_ids = [i for k, i in enumerate(all_ids) if k in missing_pos]

        names = [n for n, _, _ in SOURCES]
        offsets = dict(zip(names, rng.uniform(-0.6, 0.6, size=len(names)).round(3)))
        # Balanced assignments, in a seeded order: each source and each degradation in turn.
        sources = [names[k % len(names)] for k in rng.permutation(n_images)]
        degradations = [DEGRADATIONS[k % len(DEGRADATIONS)] for k in rng.permutation(n_images)]
        kinds = ["jpeg"] * n_images
        special = SPECIAL_FORMATS[:n_images]
        for pos, kind in zip(rng.choice(n_images, size=len(special), replace=False), special):
            kinds[int(pos)] = kind
        n_test = max(1, int(round(TEST_FRACTION * n_images))) if n_images > 1 else 0
        test_ids = sorted(rng.choice(image_ids, size=n_test, replace=False).tolist())
        test_ids = sorted(test_ids + missing_ids[:1])  # a test id without image, as in real AVA
        challenges = dict(zip(names, (1000 + 7 * k for k in range(len(names)))))
        return cls(all_ids=all_ids, image_ids=image_ids, missing_ids=missing_ids, offsets=offsets,
                   sources=sources, degradations=degradations, kinds=kinds, test_ids=test_ids,
                   challenges=challenges)


def _make_image(plan: _Plan, k: int, *, rng: np.random.Generator, source: np.ndarray, images_dir: str,
                max_side: int | None) -> tuple[SampleImage, str, tuple[int, int], np.ndarray]:
    """Crop, resize, degrade and write image ``k`` of ``plan`` from its ``source`` photo:
    (its truth, its file name, its displayed size, its votes)."""
    image_id, degradation, kind = plan.image_ids[k], plan.degradations[k], plan.kinds[k]
    (y, x, ch, cw), (oh, ow) = _plan_size(rng, *source.shape[:2], max_side)
    crop = source[y:y + ch, x:x + cw]
    img = cv2.resize(crop, (ow, oh), interpolation=cv2.INTER_AREA) if (oh, ow) != (ch, cw) else crop
    level = 0.0 if degradation == "none" else round(float(rng.uniform(0.1, 1.0)), 3)
    jpeg_q = 92
    if degradation == "jpeg" and _EXTENSION[kind] in (".jpg", ".jpeg"):
        jpeg_q = jpeg_quality(level)  # compress once, in the file itself
    else:
        img = degrade(np.ascontiguousarray(img), degradation, level, rng)
    quality = round(true_quality(level, float(plan.offsets[plan.sources[k]])), 3)
    file_name = image_id + _EXTENSION[kind]
    size = _write_image(os.path.join(images_dir, file_name), img, kind, jpeg_q)
    return (SampleImage(image_id, plan.sources[k], degradation, level, quality), file_name, size,
            draw_votes(rng, quality))


def _write_label_files(info: SampleInfo, plan: _Plan, votes: dict):
    """``AVA.txt`` (the ``votes`` of every id), ``generic_test.jpgl`` and ``truth.csv``."""
    source_of = {im.id: im.source for im in info.images}
    lines = []
    for index, image_id in enumerate(plan.all_ids, start=1):
        challenge = plan.challenges.get(source_of.get(image_id), 999)
        counts = " ".join(str(int(c)) for c in votes[image_id])
        lines.append(f"{index} {image_id} {counts} 0 0 {challenge}\n")
    with open(info.labels_path, "w", encoding="ascii", newline="\n") as f:
        f.writelines(lines)
    with open(info.test_list_path, "w", encoding="ascii", newline="\n") as f:
        f.writelines(f"{i}\n" for i in info.test_ids)
    with open(info.truth_path, "w", encoding="ascii", newline="\n") as f:
        f.write("id,file,kind,height,width,source,degradation,level,true_quality\n")
        for im in info.images:
            h, w = info.sizes[im.id]
            f.write(f"{im.id},{info.files[im.id]},{info.kinds[im.id]},{h},{w},{im.source},"
                    f"{im.degradation},{im.level:g},{im.true_quality:g}\n")


def demo_weights(net: str, weights: str = "auto") -> tuple[str, str]:
    """The weights the sample run uses, and a sentence saying which and why.

    ``auto`` means ImageNet weights when Keras can load them (from its cache, or by downloading
    them), and otherwise a seeded random backbone, *announced* as such: the sample is a demo of
    the pipeline, so it still runs end to end offline, but its numbers then say nothing about
    aesthetics. Any other value is used as given (``imagenet`` then fails when unavailable).
    """
    from .backbone import weights as backbone_weights, nets as backbones
    from .errors import WeightsUnavailableError

    if weights != "auto":
        return weights, f"weights: {weights} (as asked)"
    spec = backbones.get_backbone(net)
    try:
        backbone_weights.fetch_imagenet_weights(spec)
    except WeightsUnavailableError as exc:
        reason = str(exc.__cause__ or exc).splitlines()[0][:200]
        return "random:0", (
            f"ImageNet weights for {net} are not available here ({reason}); using a RANDOM backbone "
            f"(random:0) instead. The run shows every step of the pipeline, but its accuracy says "
            f"nothing about aesthetics. For real features, put {spec.weights_file} in "
            f"{backbone_weights.keras_cache_dir()} (from {spec.weights_url}), or run where Keras can download it."
        )
    return "imagenet", f"weights: ImageNet ({spec.weights_file})"


#: Synthetic raters' shared directions of taste, and the strength of a rater's own mix of them
#: and of their noise, relative to the generic quality (each in standard deviations).
RATER_TASTES = 3
RATER_STRENGTH = 1.0
RATER_NOISE = 0.4
#: Scores of the synthetic raters (FLICKR-AES's 1..5); each one's latent opinion is cut at these quantiles.
RATER_SCORES = (1, 2, 3, 4, 5)
RATER_CUTS = (0.1, 0.3, 0.7, 0.9)
#: Share of the synthetic raters listed as test raters (``test_users.txt``).
TEST_RATERS = 0.25


@dataclasses.dataclass
class PlantedRatings:
    """Synthetic ratings with planted preferences: ``rows`` (user, image id, score), the shared
    ``directions`` of taste (C, q), each rater's ``weights`` on them (users, q) and the raters who
    are ``noise`` only."""

    rows: list
    users: list
    directions: np.ndarray
    weights: np.ndarray
    noise: list


def plant_ratings(mean_features: np.ndarray, quality: np.ndarray, ids, *, users: int, per_user: int | None = None,
                  tastes: int = RATER_TASTES, strength: float = RATER_STRENGTH, noise: float = RATER_NOISE,
                  noise_users: int = 0, seed: int = 0) -> PlantedRatings:
    """Raters with personal taste: each one's latent opinion of an image is its standardised
    ``quality`` (the generic signal) plus ``strength`` times the rater's own mix (a random unit
    vector) of the ``tastes`` principal directions of the standardised features (people differ
    along the main axes images vary on, such as subject and style), plus Gaussian ``noise``; it is
    cut into the scores 1..5 at the rater's own quantiles :data:`RATER_CUTS`. The last
    ``noise_users`` raters rate at random. Each rater rates ``per_user`` images drawn at random
    (default: all)."""
    rng = np.random.default_rng([seed, 7])
    x = (mean_features - mean_features.mean(0)) / (mean_features.std(0) + 1e-9)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    directions = vt[:tastes].T
    taste = x @ directions
    taste /= taste.std(0) + 1e-12
    quality = np.asarray(quality, np.float64)
    quality = (quality - quality.mean()) / (quality.std() + 1e-12)
    weights = rng.normal(size=(users, tastes))
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    names = [f"rater{k:03d}" for k in range(users)]
    per_user = min(per_user or len(ids), len(ids))
    rows = []
    for k, name in enumerate(names):
        at = np.sort(rng.choice(len(ids), size=per_user, replace=False))
        if k >= users - noise_users:
            latent = rng.normal(size=per_user)
        else:
            latent = quality[at] + strength * taste[at] @ weights[k] + noise * rng.normal(size=per_user)
        scores = np.asarray(RATER_SCORES)[np.searchsorted(np.quantile(latent, RATER_CUTS), latent)]
        rows += [(name, str(ids[i]), int(s)) for i, s in zip(at, scores)]
    return PlantedRatings(rows, names, directions, weights, names[users - noise_users:])


def write_sample_ratings(store_path: str, out_dir: str, users: int, seed: int = 0,
                         unstored_ids=()) -> tuple[str, str]:
    """``ratings.csv`` (user,image,score) of ``users`` synthetic raters of every image in the
    sample's store (:func:`plant_ratings`, the last rater pure noise) plus a rating of each of
    ``unstored_ids`` (labels without images: ratings that match no stored image), and
    ``test_users.txt``, the last :data:`TEST_RATERS` of them. Returns both paths."""
    from .store.read import FeatureStore

    if users < 2:
        raise ConfigError(f"the sample's raters need at least 2 (training and test), received {users}")
    with FeatureStore(store_path) as store:
        features = store.load().astype(np.float32)
        ids, mos = list(store.ids), np.asarray(store.mos, np.float64)
    mean = features.reshape(len(ids), -1, features.shape[-1]).mean(1)
    planted = plant_ratings(mean, np.nan_to_num(mos, nan=float(np.nanmean(mos))), ids, users=users,
                            noise_users=1, seed=seed)
    rng = np.random.default_rng([seed, 8])
    rows = planted.rows + [(planted.users[0], str(i), int(rng.choice(RATER_SCORES))) for i in unstored_ids]
    ratings, test = os.path.join(out_dir, "ratings.csv"), os.path.join(out_dir, "test_users.txt")
    with open(ratings, "w", encoding="ascii", newline="\n") as f:
        f.write("user,image,score\n")
        f.writelines(f"{u},{i},{s}\n" for u, i, s in rows)
    n_test = max(1, int(round(TEST_RATERS * users)))
    with open(test, "w", encoding="ascii", newline="\n") as f:
        f.writelines(f"{u}\n" for u in planted.users[-n_test:])
    log.info("%s: %d ratings by %d synthetic raters (the last is pure noise); test raters in %s", ratings,
             len(rows), users, test)
    return ratings, test
