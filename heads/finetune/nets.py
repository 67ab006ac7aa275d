"""The backbones ``mlsp finetune`` trains end to end: a registry of :class:`FinetuneNet`.

mlsp's own backbones (:data:`mlsp.backbone.nets.BACKBONES`, ``iv3`` and ``irv2``) come with their
preprocessing and blocks; the networks the fine-tuning literature used and Keras ships are added
here: MobileNet v1 (NIMA), VGG16 (the fine-tuned classifiers, the reduced-fc study) and ResNet50.
AlexNet, the other network of those studies, is not in ``keras.applications``.

A block is what ``--unfreeze N`` counts: the network's layers after the output of block
``len(blocks) - N`` are trained in the second phase. VGG16 and ResNet50 were trained on BGR
input with the ImageNet mean subtracted (Keras' "caffe" preprocessing); here the channel swap is
folded into the first convolution's weights once they are loaded (``bgr_weights``), so every net
takes RGB and its preprocessing is a per-channel ``x * scale + offset`` (data, and a stock
``Rescaling`` layer in a saved model).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from mlsp.backbone.nets import BACKBONES, INCEPTION, Preprocessing
from mlsp.registry import Registry

_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"
#: Keras' "caffe" preprocessing in RGB order (the swap to BGR is in the first convolution)
CAFFE_RGB = Preprocessing("caffe: x - ImageNet mean (123.68, 116.779, 103.939) (RGB; the weights' BGR order is "
                          "folded into the first convolution)", 1.0, (-123.68, -116.779, -103.939))


@dataclasses.dataclass(frozen=True)
class FinetuneNet:
    """One network ``mlsp finetune`` can train; duck-types :class:`mlsp.backbone.nets.BackboneSpec`
    where :func:`mlsp.backbone.weights.build_backbone` reads it."""

    name: str
    description: str
    constructor: str  # attribute of keras.applications
    preprocessing: Preprocessing
    blocks: tuple  # layer names closing each block, in network order (what --unfreeze N counts)
    weights_file: str
    weights_url: str
    weights_hash: str | None  # the hash Keras checks the download against; None: Keras pins none
    min_side: int = 32
    constructor_kwargs: tuple = ()
    bgr_weights: bool = False  # ImageNet weights expect BGR: the first convolution's input channels are reversed
    literature: str = ""

    def build(self):
        """The Keras application without its top, for any input size, with random weights."""
        import keras

        ctor: Callable = getattr(keras.applications, self.constructor)
        return ctor(include_top=False, weights=None, input_shape=(None, None, 3), **dict(self.constructor_kwargs))


NETS: Registry[FinetuneNet] = Registry("fine-tuning backbone")


def _from_mlsp(name: str, literature: str) -> FinetuneNet:
    spec = BACKBONES[name]
    return FinetuneNet(name=spec.name, description=spec.description, constructor=spec.constructor,
                       preprocessing=spec.preprocessing, blocks=spec.taps, weights_file=spec.weights_file,
                       weights_url=spec.weights_url, weights_hash=spec.weights_hash, min_side=spec.min_side,
                       constructor_kwargs=spec.constructor_kwargs, literature=literature)


NETS.register(_from_mlsp("iv3", "MLSP's backbone (fine-tuned: the paper's baseline)"))
NETS.register(_from_mlsp("irv2", "MLSP's backbone (fine-tuned: the paper's baseline)"))


def _mobilenet(name: str, alpha: float, alpha_text: str, literature: str) -> FinetuneNet:
    return FinetuneNet(
        name=name, description=f"MobileNet v1, width {alpha:g}: 13 depthwise-separable blocks",
        constructor="MobileNet", preprocessing=INCEPTION,
        blocks=tuple(f"conv_pw_{k}_relu" for k in range(1, 14)),
        weights_file=f"mobilenet_{alpha_text}_224_tf_no_top.h5",
        weights_url=_KERAS_WEIGHTS + f"mobilenet/mobilenet_{alpha_text}_224_tf_no_top.h5",
        weights_hash=None, constructor_kwargs=(("alpha", alpha),), literature=literature)


NETS.register(_mobilenet("mobilenet", 1.0, "1_0", "NIMA (idealo; Laufer): MobileNet, dropout, 10-way softmax, EMD"))
NETS.register(_mobilenet("mobilenet_025", 0.25, "2_5", "the smallest MobileNet v1 (fast tests and trials)"))
NETS.register(FinetuneNet(
    name="vgg16", description="VGG16: 5 convolution blocks (the top's fc6/fc7 replaced by --fc)",
    constructor="VGG16", preprocessing=CAFFE_RGB, blocks=tuple(f"block{k}_pool" for k in range(1, 6)),
    weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_url=_KERAS_WEIGHTS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_hash="6d6bbae143d832006294945121d1f1fc", bgr_weights=True,
    literature="Wang, Li, Porikli (fine-tuned 2-class CNN); the reduced-fc transfer-learning study"))
NETS.register(FinetuneNet(
    name="resnet50", description="ResNet50: 16 residual blocks in 4 stages",
    constructor="ResNet50", preprocessing=CAFFE_RGB,
    blocks=tuple(f"conv{s}_block{b}_out" for s, n in ((2, 3), (3, 4), (4, 6), (5, 3)) for b in range(1, n + 1)),
    weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_url=_KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    weights_hash="4d473c1dd8becc155b73f8504c6f6626", bgr_weights=True,
    literature="a common fine-tuning baseline"))

DEFAULT_NET = "mobilenet"  # NIMA's
