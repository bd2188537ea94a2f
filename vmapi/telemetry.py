"""Prometheus metrics and the hypervisor-action log.

Metrics work in gunicorn's multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set
(deploy/gunicorn.conf.py sets it before any worker starts) every worker writes its
counters there and a scrape of ``/metrics`` on any worker adds them all up. Without it
(the in-process test client, a single process) the process's own values are served.

What is measured:
- ``vmapi_http_requests_total{route,method,status}`` and
  ``vmapi_http_request_duration_seconds{route,method}`` — route is the URL rule
  (``/api/<api_version>/vm/<id:ident>``), so ids do not multiply series;
- ``vmapi_changes_total{resource,action,outcome}`` — every write, ``ok`` or its error id
  (VM creates and deletes and their failures among them);
- ``vmapi_placement_duration_seconds`` — the scheduler's select-and-claim;
- ``vmapi_migrations_total{kind,outcome}`` and ``vmapi_migration_duration_seconds{kind}``
  — moves of VMs (live, cold, evacuate), ok or their error id;
- ``vmapi_fence_total{result}`` and ``vmapi_fence_duration_seconds`` — runs of nodes'
  fence agents: ``off`` (the node is fenced), or why not (``no_agent``, ``failed``,
  ``timeout``, ``still_on``): anything but ``off`` is a node nothing restarts from;
- ``vmapi_libvirt_call_duration_seconds{node,action}`` and
  ``vmapi_libvirt_errors_total{node,action,error}``;
- ``vmapi_node_vcpus{node,kind}``, ``vmapi_node_ram_bytes{node,kind}`` (kind: allocated,
  schedulable) and ``vmapi_node_up{node}`` — read from the database at scrape time;
- ``vmapi_db_connections_open`` and ``vmapi_db_connections_in_use`` — the pools of all
  live workers.

Each hypervisor action is also one JSON line on the ``vmapi.hypervisor`` logger (node,
domain, action, duration, result, request id).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, current_app, g, has_app_context, has_request_context, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import event, select
from sqlalchemy.engine import Engine

from vmapi.extensions import db
from vmapi.hypervisor.observed import Action
from vmapi.models import Node

hypervisor_log = logging.getLogger("vmapi.hypervisor")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "vmapi_http_requests_total",
    "HTTP requests answered.",
    ["route", "method", "status"],
    registry=None,
)
REQUEST_SECONDS = Histogram(
    "vmapi_http_request_duration_seconds",
    "Time to answer a request.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)
CHANGES = Counter(
    "vmapi_changes_total",
    "Writes by resource and action; outcome is ok or the error id.",
    ["resource", "action", "outcome"],
    registry=None,
)
PLACEMENT_SECONDS = Histogram(
    "vmapi_placement_duration_seconds",
    "Scheduler select and claim.",
    buckets=LATENCY_BUCKETS,
    registry=None,
)
LIBVIRT_SECONDS = Histogram(
    "vmapi_libvirt_call_duration_seconds",
    "libvirt calls by node.",
    ["node", "action"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)
LIBVIRT_ERRORS = Counter(
    "vmapi_libvirt_errors_total",
    "Failed libvirt calls by node.",
    ["node", "action", "error"],
    registry=None,
)
MIGRATIONS = Counter(
    "vmapi_migrations_total",
    "Moves of VMs by kind (live, cold, evacuate); outcome is ok or the error id.",
    ["kind", "outcome"],
    registry=None,
)
MIGRATION_SECONDS = Histogram(
    "vmapi_migration_duration_seconds",
    "Time of a move of a VM, from the claim on the target to the record, by kind.",
    ["kind"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=None,
)
FENCES = Counter(
    "vmapi_fence_total",
    "Fencings of nodes: off (fenced), or why not (no_agent, failed, timeout, still_on).",
    ["result"],
    registry=None,
)
FENCE_SECONDS = Histogram(
    "vmapi_fence_duration_seconds",
    "Time of a fencing: the agent's off and status calls.",
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
    registry=None,
)
DB_OPEN = Gauge(
    "vmapi_db_connections_open",
    "Database connections open in live workers.",
    registry=None,
    multiprocess_mode="livesum",
)
DB_IN_USE = Gauge(
    "vmapi_db_connections_in_use",
    "Database connections checked out now.",
    registry=None,
    multiprocess_mode="livesum",
)
OWN_METRICS = (
    REQUESTS,
    REQUEST_SECONDS,
    CHANGES,
    PLACEMENT_SECONDS,
    LIBVIRT_SECONDS,
    LIBVIRT_ERRORS,
    MIGRATIONS,
    MIGRATION_SECONDS,
    FENCES,
    FENCE_SECONDS,
    DB_OPEN,
    DB_IN_USE,
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class FleetCollector:
    """Per-node capacity and health, read from the database when scraped."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        vcpus = GaugeMetricFamily(
            "vmapi_node_vcpus",
            "vCPUs per node: allocated, and schedulable (allocated + free under the ratios).",
            labels=["node", "kind"],
        )
        ram = GaugeMetricFamily(
            "vmapi_node_ram_bytes",
            "RAM per node: allocated, and schedulable.",
            labels=["node", "kind"],
        )
        up = GaugeMetricFamily(
            "vmapi_node_up",
            "1 when the last health check reached the node's libvirt (or none ran yet).",
            labels=["node"],
        )
        ha = GaugeMetricFamily(
            "vmapi_node_ha_state",
            "1 for each node's high-availability state (ha watch); alert on fence_failed.",
            labels=["node", "state"],
        )
        rows = db.session.execute(
            select(
                Node.fqdn,
                Node.allocated_cores,
                Node.free_cores,
                Node.allocated_ram,
                Node.free_ram,
                Node.unreachable_since,
                Node.ha_state,
            ).order_by(Node.id)
        )
        for fqdn, cores, free_cores, used_ram, free_ram, down, ha_state in rows:
            vcpus.add_metric([fqdn, "allocated"], cores)
            vcpus.add_metric([fqdn, "schedulable"], cores + max(free_cores, 0))
            ram.add_metric([fqdn, "allocated"], used_ram)
            ram.add_metric([fqdn, "schedulable"], used_ram + max(free_ram, 0))
            up.add_metric([fqdn], 0 if down else 1)
            ha.add_metric([fqdn, ha_state], 1)
        db.session.rollback()
        yield from (vcpus, ram, up, ha)


def scrape() -> Response:
    registry = CollectorRegistry()
    if multiprocess_dir():
        multiprocess.MultiProcessCollector(registry)
    else:
        for metric in OWN_METRICS:
            registry.register(metric)
    registry.register(FleetCollector())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def count_connections(engine: Engine) -> None:
    event.listen(engine, "connect", lambda *a: DB_OPEN.inc())
    event.listen(engine, "close", lambda *a: DB_OPEN.dec())
    event.listen(engine, "close_detached", lambda *a: DB_OPEN.dec())
    event.listen(engine, "checkout", lambda *a: DB_IN_USE.inc())
    event.listen(engine, "checkin", lambda *a: DB_IN_USE.dec())


def register_request_metrics(app: Flask) -> None:
    @app.after_request
    def observe(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        started = g.get("started")  # set with the request id (create_app)
        if started is not None:
            REQUEST_SECONDS.labels(route, request.method).observe(time.perf_counter() - started)
        return response


def count_change(resource: str, action: str, outcome: str) -> None:
    CHANGES.labels(resource, action, outcome).inc()


def count_migration(kind: str, outcome: str, seconds: float) -> None:
    """A move of a VM: ``kind`` live, cold or evacuate; ``outcome`` ok or its error id."""
    MIGRATIONS.labels(kind, outcome).inc()
    MIGRATION_SECONDS.labels(kind).observe(seconds)


def count_fence(result: str, seconds: float) -> None:
    """A node's fencing: ``result`` off, or why it is not (see :data:`FENCES`)."""
    FENCES.labels(result).inc()
    FENCE_SECONDS.observe(seconds)


def hypervisor_action(action: Action) -> None:
    """The listener of the app's ObservedDriver: a metric and a log line per call."""
    LIBVIRT_SECONDS.labels(action.node, action.action).observe(action.seconds)
    if action.error:
        LIBVIRT_ERRORS.labels(action.node, action.action, action.error).inc()
    if has_app_context() and not current_app.config["LOG_HYPERVISOR"]:
        return  # (probes run in threads without the app: they always log)
    line: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": g.get("request_id") if has_request_context() else None,
        "node": action.node,
        "domain": action.domain,
        "action": action.action,
        "duration_ms": round(action.seconds * 1000, 2),
        "result": action.error or "ok",
    }
    if action.target is not None:  # a migration: where the domain went
        line["target"] = action.target
    hypervisor_log.info(json.dumps(line, separators=(",", ":")))
