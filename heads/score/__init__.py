"""Scores out: a run applied to a store or to image files (:mod:`.scoring`), backbone and head as
one exported model (:mod:`.export`), the catalogue of released models (:mod:`.catalogue`), the
authors' Keras 2 weight files (:mod:`.keras2`) and released models scored with their own views
(:mod:`.released`)."""
