"""An array of new VMs (POST /vm with a JSON array), its nodes called at once.

An array is all-or-nothing like every array (:mod:`vmapi.services.undo`), but its VMs
usually land on different nodes, and one node's libvirt calls need not wait for
another's. So an array of VMs that boot without an image is made in three phases:

1. in the request thread and its session, element by element as a single create does
   it: quota, claim, the row as ``building`` with its interface (its IPv6 address made
   free beforehand for the whole array, :func:`~vmapi.services.network.allocation.make_free_ipv6`);
   then each domain's :class:`~vmapi.hypervisor.DomainSpec` (the database is the
   truth); one commit for
   the whole array (its claims, rows and audit events in one transaction: a refusal at
   any element rolls back the elements before it with it);
2. one thread per node (at most ``ARRAY_NODE_THREADS`` at once): the console log's pool,
   then define, start and read the state of that node's domains, in array order. These
   threads are handed plain data (URIs, specs, names) and leave plain data: never the
   session or an ORM object — a SQLAlchemy session is not thread-safe. A node whose
   element fails stops there, and the others stop before any element past the lowest
   one that failed;
3. in the request thread again: every domain, console log and claim made goes on the
   undo stack; if an element failed, the error is that of the lowest failing element
   (the one a create one element after another would have stopped at), named by its
   ``data.index``, and the stack undoes the whole array on every node. Otherwise each
   VM's state is recorded as a single create records it, in one transaction for all.

An element failing in phase 1 (quota, capacity, UUID) is reported before any node was
called, so it wins over a node that would have failed for an earlier element.

An array with an element that boots from an image takes the sequential path
(:func:`vmapi.services.vms.create.create_one` per element): its root disk and seed
interleave database writes with volume calls on the node.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from flask import current_app

from vmapi.errors import at_index
from vmapi.hypervisor import (
    DomainInfo,
    DomainSpec,
    HypervisorDriver,
    HypervisorError,
    NameTaken,
    NoNetworkFilters,
)
from vmapi.models import Vm
from vmapi.models.leftover import DOMAIN
from vmapi.services.consoles.log import console_log_path, push_log_remover
from vmapi.services.idempotency import commit_building, commit_made
from vmapi.services.leftovers import Left
from vmapi.services.network.allocation import make_free_ipv6
from vmapi.services.network.filters import NodeFilters
from vmapi.services.network.protection import STEP as FILTER_STEP
from vmapi.services.network.protection import (
    define_stale,
    filters_on,
    no_filter_driver,
    prune,
)
from vmapi.services.nodes.domains import hypervisor_failure, name_taken, remove_domain
from vmapi.services.nodes.hosts import Host, hypervisor
from vmapi.services.undo import Undo, undone_on_failure
from vmapi.services.vms.placed import NewVm, Placed, finish, place, placed_spec

PREPARING_LOG = "preparing the console log"


@dataclass
class DomainJob:
    """One element's calls on its node, in plain data: what its node's thread is given
    (index, URI, spec) and what it leaves (how far it got, or the error that stopped it)."""

    index: int
    uri: str
    spec: DomainSpec
    #: the console log the domain writes (set: remove it on undo)
    log_path: str | None = None
    defined: bool = False
    info: DomainInfo | None = None
    step: str = PREPARING_LOG
    error: Exception | None = None
    #: the network filters its node must hold first (the first job of a node defines them)
    filters: NodeFilters | None = None


class FirstFailure:
    """The lowest array index that failed so far, shared by the node threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._index: int | None = None

    def note(self, index: int) -> None:
        with self._lock:
            if self._index is None or index < self._index:
                self._index = index

    def before(self, index: int) -> bool:
        """Whether an element before ``index`` failed: one-by-one, it would not be reached."""
        with self._lock:
            return self._index is not None and self._index < index


def create_array(checked: list[NewVm]) -> list[Vm]:
    """Create every checked VM or none (the module's three phases); the VMs in order."""
    config = current_app.config
    undo = Undo()
    make_free_ipv6(len(checked))  # one pool transaction for the array, not one per VM
    with undone_on_failure(undo):
        placed: list[Placed] = []
        jobs: list[DomainJob] = []
        for index, new in enumerate(checked):
            with at_index(index):
                placed.append(place(new, undo, False))
                jobs.append(DomainJob(index, placed[-1].host.uri, placed_spec(new, placed[-1])))
        commit_building([one.vm.id for one in placed])  # none open while the nodes answer
        by_node: dict[int, list[DomainJob]] = {}
        for one, job in zip(placed, jobs, strict=True):
            by_node.setdefault(one.host.node.id, []).append(job)
        for node_jobs in by_node.values():  # each node's, read here (the session)
            host = placed[node_jobs[0].index].host
            node_jobs[0].filters = filters_on(host, [placed[j.index].vm.id for j in node_jobs])
        pool = config["CONSOLE_LOG_POOL"]
        failure = FirstFailure()
        driver = hypervisor()
        try:
            on_nodes(
                list(by_node.values()),
                lambda jobs: build_on_node(driver, jobs, pool, config["CONSOLE_LOG_DIR"], failure),
                int(config["ARRAY_NODE_THREADS"]),
            )
        finally:  # whatever happened, what the threads made is undone with the rest
            for node_jobs in by_node.values():
                if node_jobs[0].filters is not None:
                    host = placed[node_jobs[0].index].host
                    made = [placed[job.index].vm.id for job in node_jobs]
                    undo.push(f"removing the network filters no VM uses on node {host.node.fqdn}",
                              lambda host=host, made=made: prune(host, made))  # fmt: skip
            for one, job in zip(placed, jobs, strict=True):
                remember(one, job, pool, undo)
        failed = [job for job in jobs if job.error is not None]
        if failed:
            job = min(failed, key=lambda job: job.index)
            with at_index(job.index):
                raise_failure(job, placed[job.index].host)
        made = [finish(one, job.info, False) for one, job in zip(placed, jobs, strict=True)]  # type: ignore[arg-type]
        commit_made([vm.id for vm in made])
        return made


def on_nodes(groups: list[list[DomainJob]], build: Callable[[list[DomainJob]], None],
             threads: int) -> None:  # fmt: skip
    """``build`` each node's jobs in a thread of its own, at most ``threads`` at once;
    returns when every one has ended. Each thread runs in a copy of the request's
    context, so the hypervisor action log keeps its request id (the session, also
    reachable from it, is the request's and must not be touched there)."""
    with ThreadPoolExecutor(max(1, min(threads, len(groups))), "vmapi-array") as pool:
        futures = [pool.submit(contextvars.copy_context().run, build, jobs) for jobs in groups]
    for future in futures:
        future.result()  # build keeps its errors in the jobs; anything else is a bug


def build_on_node(
    driver: HypervisorDriver, jobs: list[DomainJob], pool: str, pool_dir: str, failure: FirstFailure
) -> None:
    """Define and start one node's domains in array order (a node thread: plain data)."""
    directory: str | None = None
    for job in jobs:
        if failure.before(job.index):
            return
        try:
            if job.filters is not None:
                job.step = FILTER_STEP
                define_stale(job.uri, job.filters, driver)
                job.step = PREPARING_LOG
            if directory is None:
                directory = driver.pool_dir(job.uri, pool, pool_dir)
            job.log_path = console_log_path(directory, job.spec.name)
            job.step = "defining the domain"
            driver.define(job.uri, replace(job.spec, console_log=job.log_path))
            job.defined = True
            job.step = "starting the domain"
            driver.start(job.uri, job.spec.name)
            job.step = "reading the domain's state"
            job.info = driver.domain(job.uri, job.spec.name)
        except Exception as exc:  # translated in the request thread (it needs the session)
            job.error = exc
            failure.note(job.index)
            return


def remember(placed: Placed, job: DomainJob, pool: str, undo: Undo) -> None:
    """Put what the node's thread made for this element on the undo stack, and its
    console log on the row (committed with the domain's state)."""
    if job.log_path is not None:
        placed.vm.console_log_pool = pool
        placed.vm.console_log_path = job.log_path
        push_log_remover(undo, placed.vm, placed.host)
    if job.defined:
        host, name = placed.host, job.spec.name
        undo.push(f"removing domain {name} from node {host.node.fqdn}",
                  lambda: remove_domain(host, name),
                  Left(host.node.id, DOMAIN, name, placed.vm.id))  # fmt: skip


def raise_failure(job: DomainJob, host: Host) -> None:
    """Raise the element's error as a single create would have answered it."""
    exc = job.error
    assert exc is not None
    if not isinstance(exc, HypervisorError):
        raise exc
    if isinstance(exc, NoNetworkFilters):
        no_filter_driver(host)
    if isinstance(exc, NameTaken) and job.step != PREPARING_LOG:
        raise name_taken(exc, job.spec.name, host) from exc
    raise hypervisor_failure(exc, job.step, host) from exc
