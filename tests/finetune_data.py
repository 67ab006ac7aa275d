"""Planted data for the fine-tuning tests: photos-like images whose MOS follows what a network
can see (brightness, sharpness, colourfulness), with vote histograms around it."""

import os

import cv2
import numpy as np


def planted_images(root, n: int = 48, size: int = 96, seed: int = 0, test_fraction: float = 0.25):
    """``n`` JPEGs in ``root/images`` and ``root/labels.csv`` (id, mos, votes_1..votes_10) and
    ``root/test.txt``; returns (images folder, labels file, test list, mos by id).

    Each image is smooth random texture; three hidden factors in [0, 1] set its brightness, its
    sharpness (a Gaussian blur when low) and its colourfulness (saturation); MOS = 2 + 6 * their
    mean, plus a little noise. A method that does not look at the pixels cannot learn it."""
    rng = np.random.default_rng(seed)
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    rows, mos_by_id = [], {}
    for k in range(n):
        bright, sharp, colour = rng.random(3)
        base = rng.random((size // 8, size // 8, 3))
        img = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
        img += 0.25 * rng.standard_normal((size, size, 3))  # fine texture, erased by blur
        gray = img.mean(axis=2, keepdims=True)
        img = gray + (0.1 + 1.4 * colour) * (img - gray)
        img = np.clip((img - img.mean()) * 0.5 + 0.15 + 0.7 * bright, 0, 1)
        if sharp < 0.5:
            img = cv2.GaussianBlur(img, (0, 0), 1 + 4 * (0.5 - sharp) * 2)
        image_id = f"img{k:03d}"
        cv2.imwrite(os.path.join(images, image_id + ".jpg"), (img[..., ::-1] * 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        mos = float(np.clip(2 + 6 * (bright + sharp + colour) / 3 + 0.2 * rng.standard_normal(), 1.2, 9.8))
        votes = np.exp(-0.5 * ((np.arange(1, 11) - mos) / 1.2) ** 2)
        votes = np.round(100 * votes / votes.sum()).astype(int)
        votes[int(round(mos)) - 1] += 1
        rows.append((image_id, mos, votes))
        mos_by_id[image_id] = mos
    labels = os.path.join(root, "labels.csv")
    with open(labels, "w") as handle:
        handle.write("id,mos," + ",".join(f"votes_{k}" for k in range(1, 11)) + "\n")
        for image_id, mos, votes in rows:
            handle.write(f"{image_id},{mos:.4f}," + ",".join(str(v) for v in votes) + "\n")
    test = os.path.join(root, "test.txt")
    ids = [r[0] for r in rows]
    with open(test, "w") as handle:
        handle.write("\n".join(ids[: int(n * test_fraction)]) + "\n")
    return images, labels, test, mos_by_id
