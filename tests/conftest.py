"""Shared fixtures: the real test search service and a tracer running in the background."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from agent.extract import QueryIdExtractor
from agent.model import Event
from agent.probes import ProbeConfig
from agent.sink import ListSink
from agent.targets import TargetSpec
from agent.tracer import Tracer
from searchsvc.cluster import Cluster

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("searchsvc")) as c:
        yield c


@contextmanager
def background_tracer(
    spec: TargetSpec,
    extractor: QueryIdExtractor | None = None,
    config: ProbeConfig | None = None,
) -> Iterator[tuple[Tracer, ListSink]]:
    """A started tracer draining on its own thread; on exit it is stopped, detached and
    fully drained, so the sink holds every event the kernel handed over."""
    sink = ListSink()
    tracer = Tracer(spec, sink, extractor, config).start()
    thread = threading.Thread(target=tracer.run, name="tracer", daemon=True)
    thread.start()
    try:
        yield tracer, sink
    finally:
        tracer.stop_event.set()
        thread.join()
        tracer.close()


def qtrace_programs() -> list[str]:
    """Names of qtrace's BPF programs loaded in the kernel right now."""
    out = subprocess.run(
        ["bpftool", "prog", "list", "-j"], check=True, capture_output=True, text=True
    ).stdout
    progs: list[dict[str, Any]] = json.loads(out)
    return [p["name"] for p in progs if p.get("name", "").startswith("qt_")]


def events_of(events: list[Event], pid: int) -> list[Event]:
    return [e for e in events if e.pid == pid]


# Property-based tests: "ci" keeps every hypothesis test file well under a minute on the
# CI machine (2 shared cores); "fuzz" is for long local runs (HYPOTHESIS_PROFILE=fuzz).
settings.register_profile("ci", max_examples=100, deadline=timedelta(seconds=5), print_blob=True)
settings.register_profile("fuzz", max_examples=20_000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
