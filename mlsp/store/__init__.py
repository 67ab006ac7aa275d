"""The feature store, the contract between the stages (features/README.md): its format
(:mod:`.format`), its root attributes (:mod:`.config`), writing its layout (:mod:`.write`), an
extraction's crash-safe partial results (:mod:`.shards`), reading it (:mod:`.read`) and its labels
and splits (:mod:`.labels`)."""
