"""The demo fabric: machines with real data, a verifiable workload, and its verifier.

* :mod:`siterecovery.demo.fabric` makes disk images whose first part holds real data (with a
  ``<image>.base.json`` sidecar of per-chunk hashes), serves images over NBD with a minimal
  qemu-storage-daemon, and writes the site inventory TOML.
* :mod:`siterecovery.demo.workload` is a "guest" that writes self-describing 4 KiB blocks to a
  machine's disks over NBD, one at a time, and logs every completed write.
* :mod:`siterecovery.demo.verify` proves that a recovered copy of the disks is a crash-consistent
  prefix of the workload's single global write sequence.
"""
