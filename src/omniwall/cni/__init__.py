"""The `omniwall` CNI plugin (CNI spec 1.0): a routed veth with a /32 per container, the container
registered as a Workload with the manager, and ADD returning only once the host's agent has realized
the container's rules. Docs: docs/containers.md."""
