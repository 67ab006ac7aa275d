"""Stage 1 as a job: images -> features in a store, on one machine (:mod:`.job`) or over a
Ray cluster (:mod:`.cluster`)."""
