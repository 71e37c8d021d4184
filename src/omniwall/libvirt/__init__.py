"""libvirt integration: the QEMU hook that registers domains with the manager (docs/vms.md)."""
