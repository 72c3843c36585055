"""What the tests share, in one place (imported as ``tests._support.<module>``, never from a conftest or a
test module):

* :mod:`.core`: the fake clock, the one :class:`~tests._support.core.AppSecret` and its factory, events,
  gates and waits for the provider tests.
* :mod:`.policies`: named :class:`~apimvault.CachePolicy` presets (``FAST_REFRESH``, ``SHORT_BACKOFF``, ...).
* :mod:`.providers`: typed provider factories on the local stack.
* :mod:`.cli`: rotating apps, CLI runs in-process, gateway probes, the no-key-in-output check.
* :mod:`.rotation`: the rotator identity with infra's roles, a manual clock, an interleaving scheduler.
* :mod:`.events`: Event Grid events for the rotation tests.
* :mod:`.canary`: the key-leak canary (also a pytest plugin: ``pytest -p tests._support.canary --canary``).
* :mod:`.faults`: the fault-matrix harness (sync/async providers and clients, outcomes).
"""
