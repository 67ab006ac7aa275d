"""The ImageNet networks features come from: the registry (:mod:`.nets`), their weights
(:mod:`.weights`), batch-norm folding (:mod:`.folding`), the reader of Keras' graph (:mod:`.graph`),
FLOPs (:mod:`.cost`), the registered Keras layers (:mod:`.layers`, :mod:`.pooling`) and built
extractors kept on disk (:mod:`.forward_cache`)."""
