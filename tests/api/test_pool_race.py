"""Nodes' storage pools made by racing requests (issue 17: an array's node threads, or
several workers, ask a fresh host for the console-log pool at once)."""

from __future__ import annotations

import threading

from vmapi.hypervisor.libvirt.driver import LibvirtDriver


def test_racing_calls_make_one_pool_and_all_get_its_directory(host_uri, uri_policy):
    uri = host_uri()
    driver = LibvirtDriver(timeout=10, policy=uri_policy)
    answers: list[object] = []
    for round_ in range(40):  # a race: many tries, each a fresh pool
        start = threading.Barrier(8)

        def ask(name: str = f"vmapi-race{round_}", start: threading.Barrier = start) -> None:
            start.wait(5)
            try:
                answers.append(driver.pool_dir(uri, name, f"/{name}"))
            except Exception as exc:  # the answer under test
                answers.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    driver.connections.clear()
    assert answers == [f"/vmapi-race{n}" for n in range(40) for _ in range(8)]
