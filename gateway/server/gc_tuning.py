"""The garbage collector set for a long-running server, once start-up is done.

CPython runs a young-generation collection every 700 net allocations of container objects;
a proxied request allocates a few hundred (request, headers, futures, frames), so about every
other request paid for a collection that also walked the objects start-up left behind (a
callgrind count of S3: ~30k of ~586k instructions per request in ``gc_collect_main``).
Objects freed by reference counting, nearly all of a request's, are not affected: only cyclic
garbage waits a little longer for its collection.
"""

from __future__ import annotations

import gc

# young-generation threshold: ~20-30 requests' worth of allocations between collections
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Move what start-up made (modules, config, routes) out of the collector's sight, and
    collect the young generation less often. Called once, in the serving process only."""
    gc.collect()
    gc.freeze()  # never garbage while serving: no collection needs to walk it again
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
