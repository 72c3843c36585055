"""Named :class:`~apimvault.CachePolicy` presets: the numbers most tests share, in one place.

Every preset has no jitter (``jitter=0``), so a test's fake clock decides exactly when the key is due. A
module that needs numbers of its own keeps a module-local policy, with a comment saying why.

* :data:`FAST_REFRESH`: 5-minute TTL, 60 s margin, and a forced refresh allowed every 5 s, so a test can
  rotate the key and advance the clock past ``forced_refresh_interval`` to let a 401 refresh it.
* :data:`SHORT_BACKOFF`: 5-minute TTL, 60 s margin, stale for at most 600 s, and a 1 s .. 8 s backoff, so a
  test can walk the fresh, stale and expired states and the retry schedule with a few clock steps.
* :data:`STEADY`: 5-minute TTL and 60 s margin, everything else the library's defaults.
"""

from __future__ import annotations

from apimvault import CachePolicy

FAST_REFRESH = CachePolicy(ttl=300, jitter=0, refresh_margin=60, forced_refresh_interval=5)
SHORT_BACKOFF = CachePolicy(
    ttl=300, jitter=0, refresh_margin=60, max_staleness=600, backoff_initial=1, backoff_max=8
)
STEADY = CachePolicy(ttl=300, jitter=0, refresh_margin=60)
