"""QEMU guests for Omniwall: the guest image (image.py), the QEMU runner (qemu.py), the QMP client
(qmp.py) and the guest's command channel (channel.py). Used by the lab (lab/vm.py) and, later, by live
migration and the libvirt hook. Docs: docs/vms.md."""
