# The README's first two commands: `make demo` and `make test`. Both start with `install`, so a fresh
# machine needs nothing else.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# lintian, dpkg-dev (dpkg-deb, strip), systemd (systemd-analyze) and python3-venv: `make deb` and its checks
APT_PACKAGES := nftables libnftables1 conntrack iproute2 iperf3 netcat-openbsd iputils-ping procps curl chromium etcd-server \
  lintian dpkg-dev systemd python3-venv
# VM workloads (docs/vms.md): QEMU with software emulation and busybox for the guest image, without the
# recommended GUI/firmware extras; libvirt's daemon, QEMU driver and virsh for the libvirt hook's tests
# (not libvirt-daemon-system: its init script would start a system libvirtd, and its NAT network, in
# the root namespace; the tests run a private libvirtd inside a lab host namespace).
# Containers (docs/containers.md, tests/kernel/test_cni_podman.py): podman with runc (crun refuses this
# machine's hybrid cgroup hierarchy), conmon, and netavark for podman's `container-network-stack`
# dependency (not containernetworking-plugins, which pulls iptables; the tests use podman's CNI backend
# with only the omniwall plugin). docs/design/dependencies.md.
VM_APT_PACKAGES := qemu-system-x86 qemu-utils busybox-static libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
  podman runc conmon netavark
STAMP := $(VENV)/.installed
VM_IMAGE := $(VENV)/share/omniwall/vm/image.json

.PHONY: install system-packages vm-image test unit kernel lint demo demo-ha fuzz-dataplane bench bench-kernel deb deb-check clean

install: system-packages $(STAMP) $(VM_IMAGE)

# Installs the kernel tooling when running as root and something is missing; never touches firewall state.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing system packages:$$missing (run as root to install)"; fi; \
	fi
	@missing=""; for p in $(VM_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "warning: missing system packages:$$missing (run as root to install)"; fi; \
	fi

# The guest image of the lab's VM workloads: a Debian kernel (apt-get download, never installed) and a
# busybox initramfs, built once into the venv and reused (python -m omniwall.vm.image).
vm-image: $(VM_IMAGE)

$(VM_IMAGE): src/omniwall/vm/guest_init.sh src/omniwall/vm/image.py | system-packages $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-cache show linux-image-amd64 >/dev/null 2>&1 || apt-get update -qq; \
	  $(BIN)/python -m omniwall.vm.image build --force; \
	else echo "warning: not root: no VM guest image (the VM lab tests skip)"; fi

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# ruff (checks and formatting), then the import contracts of pyproject.toml (package layers, no cycles:
# docs/design/packages.md)
lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports --no-cache --no-logo

# --durations: every CI log lists the slowest tests, to keep the suite inside its 30 min budget.
# The kernel, lab and browser tests run one at a time (timing, namespaces, one lab per test); tests/unit
# runs on UNIT_WORKERS pytest-xdist workers, a module to a worker (its fixtures set up once). Both runs
# happen even when the first fails; the target fails if either did.
UNIT_WORKERS ?= 2
test: install lint
	@rc=0; \
	$(BIN)/pytest -q --durations=30 tests/browser tests/e2e tests/kernel || rc=1; \
	$(BIN)/pytest -q --durations=20 -n $(UNIT_WORKERS) --dist loadfile tests/unit || rc=1; \
	exit $$rc

unit: install
	$(BIN)/pytest -q -n $(UNIT_WORKERS) --dist loadfile tests/unit

kernel: install
	$(BIN)/pytest -q tests/kernel tests/e2e

demo: install
	$(BIN)/python -m omniwall.demo

demo-ha: install
	$(BIN)/python -m omniwall.demo_ha

fuzz-dataplane: install
	$(BIN)/python -m omniwall.fuzz --probes 100000

# Benchmarks are kept out of `make test`; numbers and commands are in BENCHMARKS.md.
bench: install
	$(BIN)/python bench/compile.py

# Root only: labs of network namespaces with real traffic (each takes minutes).
bench-kernel: install
	$(BIN)/python bench/dataplane.py
	$(BIN)/python bench/propagation.py
	$(BIN)/python bench/identity.py
	$(BIN)/python bench/migration.py --migrations 100

# The Debian package (docs/install.md): dist/omniwall_<version>-1_<arch>.deb, its Python dependencies in a
# private environment fetched from the package index. `make test` checks a quick build without them
# (tests/unit/test_packaging.py); deb-check runs the same checks on the full package (minutes).
deb: install
	packaging/deb/build-deb dist

deb-check: install
	OMNIWALL_DEB_FULL=1 $(BIN)/pytest -q tests/unit/test_packaging.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
