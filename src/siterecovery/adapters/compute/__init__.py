"""Compute: adapters of the compute port (``siterecovery.ports.compute``) and machine artifacts.

* :mod:`.qemu` - ``QemuMachineControl``: stop/resume a QEMU VM's or qemu-storage-daemon's
  writes over QMP, power it off, open in-place writers of its disks over NBD.
* :mod:`.image` - ``NbdDiskWriter`` (a DiskWriter over a writable NBD export) and
  ``serve_image``/``open_image_writer`` (an image file written through a private
  qemu-storage-daemon, or directly for raw files).
* :mod:`.raw` - ``RawFileWriter``: a DiskWriter for raw image files and block devices.
* :mod:`.artifacts` - ``write_machine_artifacts``: machine.json, libvirt domain.xml and the
  cloud-init NoCloud seed (directory and ISO) of a recovered machine.

Modules are imported explicitly so that raw sites and artifact writing do not need libnbd.
"""
