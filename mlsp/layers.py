"""Small registered Keras layers of the backbone graph (see also :mod:`mlsp.pooling`)."""

import keras


@keras.saving.register_keras_serializable(package="mlsp")
class FoldedBatchNorm(keras.layers.Layer):
    """What remains of a batch norm folded into the convolution before it: the identity.

    It keeps the batch norm's name and call signature (``training``, ``mask``), so a model
    rebuilt with :func:`mlsp.backbones.fold_batch_norms` has the same layer names and graph."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape
