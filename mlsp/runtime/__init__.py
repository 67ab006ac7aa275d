"""What every stage runs on: the Keras backend (TensorFlow or PyTorch) and compute precision,
files written whole or not at all, the store's lock and free space, progress, downloads checked by
sha256, and the index of hashes mlsp itself wrote (trust). Imports nothing else of mlsp but
:mod:`mlsp.errors` and :mod:`mlsp.registry`."""
