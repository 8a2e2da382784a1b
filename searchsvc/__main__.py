"""``python -m searchsvc --data DIR [--port P] [--host H] [--fault-rate F]
[--faults stale-index,deadline,...] [--deadline-ms MS] [--fault-seed S]``: run a cluster
(fault rate 0, the default, is the "old deployment"; above 0 the "new" one)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from searchsvc.cluster import Cluster
from searchsvc.faults import add_fault_args

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="searchsvc")
    parser.add_argument("--data", type=Path, required=True, help="index directory")
    parser.add_argument("--port", type=int, default=0, help="root port (0: any)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    add_fault_args(parser)
    args = parser.parse_args(argv)

    # Until the cluster is up, SIGTERM unwinds like Ctrl-C so start() can reap
    # the children it already spawned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster = Cluster(
        args.data,
        host=args.host,
        root_port=args.port,
        fault_rate=args.fault_rate,
        faults=args.faults,
        deadline_ms=args.deadline_ms,
        fault_seed=args.fault_seed,
    )
    with cluster:
        print(f"root {cluster.root_url}", flush=True)
        for role, pid in cluster.pids.items():
            print(f"pid {role} {pid}", flush=True)
        # Children are spawned already, so blocking here is not inherited;
        # sigwait then has no check-then-wait race.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        signal.sigwait(_STOP_SIGNALS)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
