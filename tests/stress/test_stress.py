"""CI-sized stress (long form: ``bench/stress.py``): threads and asyncio tasks through real clients while the
key is rotated with the old key revoked and refreshes are pushed, on a simulated clock. Repeated 20x.

Asserted each time: no worker exception, no deadlock (bounded waits and joins), every request reached the
gateway with a valid key except refused ones that were re-sent (``key:invalid`` == re-sends), vault reads
within the policy's bound. Connection errors between the client and an overloaded local stack (openai's
APIConnectionError caused by httpx2/httpcore2) are the machine, not apimvault: tolerated up to 1 %, counted.
Speed is not asserted (that is bench/)."""

from __future__ import annotations

import pytest
from bench.stress import run_stress

from apimvault.local import LocalAzure


@pytest.mark.timeout(90)
# One repetition in the default run; the other 19 with the slow set (.ci/run runs both).
@pytest.mark.parametrize("repetition", [0, *(pytest.param(i, marks=pytest.mark.slow) for i in range(1, 20))])
def test_stress_ci_sized(azure: LocalAzure, repetition: int) -> None:
    # Alternate the mix so both shells get the heavier share; both run concurrently in every repetition.
    threads, tasks = (8, 16) if repetition % 2 else (4, 32)
    result = run_stress(
        azure, threads=threads, tasks=tasks, steps=7, rotate_every=3, push_every=2, stall_s=30
    )
    assert result.problems() == [], result.as_dict()
    assert result.rotations == 2 and result.pushes == 3
    assert result.steps == 7 and result.ok + result.transport >= 8 * (threads + tasks)
