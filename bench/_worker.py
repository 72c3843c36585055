"""A load-generating child process for the stack-capacity figures.

``python -m bench._worker {kv|chat} SECONDS THREADS START_AT`` (environment: the stack's variables and
CA) imports the SDKs, waits until the Unix time ``START_AT``, runs ``THREADS`` threads sharing one client
for ``SECONDS`` and prints ``{"calls": n, "wall": s}``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(mode: str, seconds: float, threads: int, start_at: float) -> None:
    from .contenders import STATIC, chat_client, chat_once, key_source, secret_client
    from .throughput import remote_target, run_threads

    target = remote_target(dict(os.environ))
    if mode == "kv":
        client, _ = secret_client(target)
        client.get_secret(target.secret_name)

        def call() -> None:
            client.get_secret(target.secret_name)
    else:
        chat = chat_client(STATIC, target, key_source(STATIC, target))
        chat_once(chat, target)

        def call() -> None:
            chat_once(chat, target)

    time.sleep(max(0.0, start_at - time.time()))
    n, wall, _ = run_threads(call, seconds, threads)
    print(json.dumps({"calls": n, "wall": wall}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
