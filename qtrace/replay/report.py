"""Sends the replay's anomalies to the collector in the background, in small batches."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import grpc

from qtrace.api.v1 import anomalies_pb2, services_pb2_grpc
from qtrace.client import channel
from qtrace.replay.compare import Response
from qtrace.replay.runner import Outcome

MAX_VALUE = 512  # longer values are sent as digests


def _value(v: Any) -> Any:
    text = json.dumps(v)
    if len(text) <= MAX_VALUE:
        return v
    from qtrace.replay.compare import digest

    return digest(text.encode())


def _target(r: Response) -> dict[str, Any]:
    return {"status": r.status, "latency_ns": r.latency_ns, "error": r.error}


def anomalies_of(o: Outcome, session_id: str) -> list[anomalies_pb2.Anomaly]:
    targets = {name: _target(r) for name, r in o.responses.items()}
    out = []
    if o.diffs:
        detail = {
            "differences": [
                {"path": d.path, "primary": _value(d.left), "candidate": _value(d.right)}
                for d in o.diffs
            ],
            "targets": targets,
            "request": o.request.to_json(),
        }
        out.append(
            anomalies_pb2.Anomaly(
                query_id=o.query_id,
                type=anomalies_pb2.ANOMALY_TYPE_MISMATCH,
                session_id=session_id,
                detail_json=json.dumps(detail),
                source="replay",
            )
        )
    failed = {n: r.error for n, r in o.responses.items() if r.error is not None}
    if failed:
        detail = {"errors": failed, "targets": targets, "request": o.request.to_json()}
        out.append(
            anomalies_pb2.Anomaly(
                query_id=o.query_id,
                type=anomalies_pb2.ANOMALY_TYPE_ERROR,
                session_id=session_id,
                detail_json=json.dumps(detail),
                source="replay",
            )
        )
    return out


class Reporter:
    def __init__(self, collector: str, session_id: str) -> None:
        self.session_id = session_id
        self._channel = channel(collector)
        self._stub = services_pb2_grpc.ControlServiceStub(self._channel)
        self._q: queue.Queue[anomalies_pb2.Anomaly | None] = queue.Queue()
        self.sent = 0
        self.failed = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="replay-report", daemon=True)
        self._thread.start()

    def add(self, o: Outcome) -> None:
        for a in anomalies_of(o, self.session_id):
            self._q.put(a)

    def _send(self, batch: list[anomalies_pb2.Anomaly]) -> None:
        try:
            self._stub.ReportAnomalies(
                anomalies_pb2.ReportAnomaliesRequest(anomalies=batch), timeout=10
            )
            self.sent += len(batch)
        except grpc.RpcError as e:
            self.failed += len(batch)
            self.last_error = f"{e.code().name}: {e.details()}"

    def _run(self) -> None:
        done = False
        while not done:
            item = self._q.get()
            batch: list[anomalies_pb2.Anomaly] = []
            if item is None:
                done = True
            else:
                batch.append(item)
            while len(batch) < 200:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    done = True
                    break
                batch.append(nxt)
            if batch:
                self._send(batch)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)
        self._channel.close()
