"""Training a head on a store: the hyper-parameters (:mod:`.config`), the paper's learning-rate
schedule (:mod:`.schedule`, :mod:`.schedule_callback`), the callbacks (:mod:`.callbacks`) and the
loop (:mod:`.loop`)."""
