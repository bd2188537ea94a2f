"""What a VM's domain needs, from the database's point of view (a ``DomainSpec``).

The persistent definition on the host is always rewritten from this, so the database
stays the truth: a resize changes the row, then redefines the domain from it.
"""

from __future__ import annotations

from typing import Any

from vmapi.hypervisor import DomainSpec
from vmapi.models import VirtMethod, Vm

MIB = 1024 * 1024


def domain_spec(vm: Vm, method: VirtMethod, config: dict[str, Any]) -> DomainSpec:
    max_vcpus = max(vm.cores, int(config["VM_MAX_VCPUS"]))
    max_memory = max(vm.ram, int(vm.ram * float(config["VM_MAX_RAM_FACTOR"])) // MIB * MIB)
    quota = vm.cputime_limit
    return DomainSpec(
        name=vm.name,
        uuid=vm.uuid,
        domain_type=method.domain_type,
        vcpus=vm.cores,
        max_vcpus=max_vcpus,
        memory=vm.ram,
        max_memory=max_memory,
        vm_id=vm.id,
        installation=config["INSTALLATION_ID"],
        cpu_period=config["CPU_PERIOD"] if quota is not None else None,
        cpu_quota=quota,
    )
