"""Omniwall: a distributed firewall enforced in every host's kernel at each workload's vNIC."""

__version__ = "0.1.0"
PROVIDER_TENANT = "infra"
