"""Measuring on a shared machine: wait for quiet, retry a disturbed step, keep the least disturbed."""

from __future__ import annotations

import common
from common import log


CLEAN = {"other_cores": 0.15, "tries": 3, "max_wait": 90.0, "waited_s": 0.0}


def cleanest(label: str, fn, *args, **kwargs):
    """Run a measurement; while it was disturbed beyond repair, run it again (at most
    ``CLEAN['tries']`` times in all) and keep the least disturbed attempt. Disturbed: other
    processes used more than ``CLEAN['other_cores']`` CPU cores meanwhile; beyond repair: the
    measurement has no per-image correction, or too few undisturbed images for one. ``fn``
    returns a dict with a ``phase`` record, or a tuple whose first item is one. The kept result
    gets ``attempts_other_cores``: the other-process load of every attempt."""
    best, best_load, best_rank, loads = None, None, None, []
    for attempt in range(max(1, CLEAN["tries"])):
        waited = common.wait_quiet(CLEAN["max_wait"], CLEAN["other_cores"])
        CLEAN["waited_s"] += waited
        if waited >= CLEAN["max_wait"]:
            log(f"  {label}: the machine stayed busy for {waited:.0f} s; measuring anyway")
        result = fn(*args, **kwargs)
        figures = result[0] if isinstance(result, tuple) else result
        load = figures["phase"].get("other_cores") or 0.0
        loads.append(round(load, 3))
        repaired = figures.get("correction", {}).get("applied", False)
        # a repaired attempt beats any unrepaired one; then the least disturbed
        rank = (0 if repaired or load <= CLEAN["other_cores"] else 1, load)
        if best is None or rank < best_rank:
            best, best_load, best_rank = result, load, rank
        if load <= CLEAN["other_cores"] or repaired:
            break
        if attempt + 1 < CLEAN["tries"]:
            log(f"  {label}: other processes used {load:.2f} cores meanwhile; measuring again")
    figures = best[0] if isinstance(best, tuple) else best
    figures["attempts_other_cores"] = loads
    figures["disturbed"] = best_load > CLEAN["other_cores"] and not figures.get("correction", {}).get("applied", False)
    return best
