"""Run by tests/unit/test_nocloud_cloudinit.py with the system Python, where Debian's
``cloud-init`` package lives: cloud-init's own code reads a NoCloud seed and this script
prints, as JSON, what cloud-init made of it. It imports nothing of vmapi.

    cloudinit_probe.py find ISO_FILE      # the blkid look-ups NoCloud finds its volume by
    cloudinit_probe.py read SEED_DIR      # the NoCloud reader and the network parser
    cloudinit_probe.py boots WORK SEED... # successive boots of one guest, one seed each

Everything cloud-init writes goes under a temporary folder (its cloud_dir and run_dir);
nothing is applied to this machine's network.
"""

import json
import os
import shutil
import sys
import tempfile

from cloudinit import distros, helpers, settings, sources, stages, util
from cloudinit.config import cc_ssh
from cloudinit.event import EventScope, EventType
from cloudinit.net import network_state, networkd
from cloudinit.sources.DataSourceNoCloud import DataSourceNoCloud

# Only the seed folder: never probe this machine's block devices for a cidata label.
NOCLOUD_CFG = {"NoCloud": {"fs_label": None}}


def _seed_into(cloud_dir, seed_dir):
    target = os.path.join(cloud_dir, "seed", "nocloud")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(seed_dir, target)


def _network(config):
    state = network_state.parse_net_config_data(config, skip_broken=False)
    interfaces = []
    for iface in state.iter_interfaces():
        subnets = [
            {
                key: subnet.get(key)
                for key in ("type", "address", "prefix", "gateway", "dns_nameservers", "routes")
            }
            for subnet in iface.get("subnets", [])
        ]
        interfaces.append(
            {
                "name": iface["name"],
                "type": iface["type"],
                "mac_address": iface.get("mac_address"),
                "dns_nameservers": (iface.get("dns") or {}).get("nameservers"),
                "subnets": subnets,
            }
        )
    with tempfile.TemporaryDirectory() as target:
        networkd.Renderer({}).render_network_state(state, target=target)
        folder = os.path.join(target, "etc", "systemd", "network")
        rendered = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as f:
                rendered[name] = f.read()
    return {
        "interfaces": interfaces,
        "dns_nameservers": list(state.dns_nameservers),
        "networkd": rendered,
    }


def find(iso_file):
    """What DataSourceNoCloud._get_devices asks blkid, asked of one file."""
    return {
        criteria: util.find_devs_with(criteria, path=iso_file, no_cache=True)
        for criteria in ("TYPE=iso9660", "LABEL=CIDATA", "LABEL=cidata")
    }


def read(seed_dir):
    with tempfile.TemporaryDirectory() as work:
        paths = helpers.Paths({"cloud_dir": work, "run_dir": os.path.join(work, "run")})
        _seed_into(work, seed_dir)
        sys_cfg = {"datasource": NOCLOUD_CFG}
        distro = distros.fetch("debian")("debian", {}, paths)
        ds = DataSourceNoCloud(sys_cfg, distro, paths)
        if not ds.get_data():
            return {"found": False}
        parts = [
            {"content_type": part.get_content_type(), "payload": part.get_payload(decode=True)}
            for part in ds.get_userdata().walk()
            if not part.is_multipart()
        ]
        return {
            "found": True,
            "seed": ds.seed,
            "instance_id": ds.get_instance_id(),
            "hostname": ds.get_hostname().hostname,
            "fqdn": ds.get_hostname(fqdn=True).hostname,
            "public_keys": ds.get_public_ssh_keys(),
            "userdata_raw": ds.get_userdata_raw().decode("utf-8"),
            "userdata_parts": [
                {"content_type": p["content_type"], "payload": p["payload"].decode("utf-8")}
                for p in parts
            ],
            "network": _network(ds.network_config),
        }


def _record_instead_of_touching_this_host(distro, applied):
    """The three steps of ``Init.apply_network_config`` that would touch this machine's
    interfaces (wait for the guest's NICs, rename them, write and apply the config)
    record the config instead; cloud-init's decision to reach them is left as it is."""
    distro.networking.wait_for_physdevs = lambda netcfg, strict=True: None
    distro.networking.apply_network_config_names = lambda netcfg: None
    distro.apply_network_config = lambda netcfg, bring_up=False: applied.append(netcfg)


class _Init(stages.Init):
    """cloud-init's Init with its configuration given here instead of /etc/cloud."""

    def __init__(self, cfg):
        super().__init__(ds_deps=[sources.DEP_FILESYSTEM])
        self._given_cfg = cfg

    def _read_cfg(self, extra_fns):
        return json.loads(json.dumps(self._given_cfg))


def boots(work, seed_dirs):
    """One boot per seed, in order, as cloud-init's local stage does it: read the seed
    (or trust the cached datasource if its instance-id still matches), then record the
    instance. Reports what cloud-init decides at each boot."""
    cloud_dir = os.path.join(work, "cloud")
    run_dir = os.path.join(work, "run")
    cfg = {
        "system_info": {"distro": "debian", "paths": {"cloud_dir": cloud_dir, "run_dir": run_dir}},
        "datasource_list": ["NoCloud"],
        "datasource": NOCLOUD_CFG,
    }
    results = []
    for seed_dir in seed_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)  # /run does not survive a reboot
        _seed_into(cloud_dir, seed_dir)
        init = _Init(cfg)
        init.initialize()
        init.purge_cache()
        ds = init.fetch(existing="check")
        restored = init.ds_restored
        init.instancify()
        applied = []
        _record_instead_of_touching_this_host(init.distro, applied)
        # cloud-init's own decision: apply the network config on this boot or not.
        init.apply_network_config(bring_up=False)
        # cloud-init's own runner decides whether a once-per-instance module (cc_ssh,
        # which installs the keys) runs on this boot.
        ssh_ran, _ = init.cloudify().run(
            "config_ssh", lambda: None, [], freq=cc_ssh.meta["frequency"]
        )
        results.append(
            {
                "instance_id": ds.get_instance_id(),
                "restored_from_cache": restored,
                "new_instance": init.is_new_instance(),
                "network_on_boot_event": stages.update_event_enabled(
                    ds, init.cfg, EventType.BOOT, EventScope.NETWORK
                ),
                "network_applied": [
                    [s["address"] for i in _network(c)["interfaces"] for s in i["subnets"]]
                    for c in applied
                ],
                "ssh_module_ran": bool(ssh_ran),
                "public_keys": ds.get_public_ssh_keys(),
            }
        )
    return {"boots": results, "ssh_frequency": cc_ssh.meta["frequency"]}


if __name__ == "__main__":
    assert settings.PER_INSTANCE  # cloud-init is importable: fail loudly otherwise
    if sys.argv[1] == "find":
        print(json.dumps(find(sys.argv[2])))
    elif sys.argv[1] == "read":
        print(json.dumps(read(sys.argv[2])))
    elif sys.argv[1] == "boots":
        print(json.dumps(boots(sys.argv[2], sys.argv[3:])))
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
