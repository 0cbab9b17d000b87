"""Sources: adapters that implement the Source port (``siterecovery.ports.source``).

* :mod:`.qemu` - ``QemuSource``: a QEMU VM or qemu-storage-daemon over QMP; persistent dirty
  bitmaps for change tracking, fleecing for crash-consistent point-in-time views, read over NBD.
* :mod:`.raw` - ``RawSource``: raw image files or block devices read live (no tracking).
* :mod:`.qemu_daemon` - ``MachineDaemon``: the stand-in VM (qemu-storage-daemon owning qcow2
  disks, exporting them writable over NBD) used by tests, the demo and failover.
* :mod:`.qmp` - ``QmpClient``; :mod:`.nbd` - libnbd helpers shared with workloads and
  materialization.

Modules are imported explicitly (``from siterecovery.adapters.sources.qemu import QemuSource``)
so that using ``RawSource`` does not require libnbd.
"""
