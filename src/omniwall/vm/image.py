"""The guest image: an uncompressed Debian kernel and a busybox initramfs, built from Debian packages only.

- kernel: the `linux-image-*-amd64` package the `linux-image-amd64` metapackage points at (its
  payload is xz; the smaller cloud flavour's is lz4, which Python cannot unpack without another
  dependency), fetched with `apt-get download` and unpacked with `dpkg-deb -x`: never installed on the
  host. QEMU boots the ELF inside `vmlinuz` (the xz payload, found by its magic bytes) through its PVH
  entry: about 2 s under TCG, against much longer for the self-decompressing bzImage.
- initramfs (newc cpio, written here): `/bin/busybox` from `busybox-static`, the virtio network
  modules (loaded by /init in dependency order), /init (`guest_init.sh`), /dev/console.

Built once (`python -m omniwall.vm.image build`, run by `make install` as root) into the image directory,
`$OMNIWALL_VM_IMAGE_DIR` or `<venv>/share/omniwall/vm`, and reused: `image.json` names the files.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

KERNEL_META = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")  # busybox-static's binary
# In dependency order (busybox insmod does not resolve dependencies).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
RECORD = "image.json"


class VmImageError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path  # uncompressed ELF vmlinux
    initrd: Path  # newc cpio
    version: str  # the kernel's release, e.g. 6.1.0-57-cloud-amd64


def image_dir() -> Path:
    env = os.environ.get("OMNIWALL_VM_IMAGE_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "omniwall" / "vm"


def load(directory: Path | None = None) -> GuestImage:
    """The built image; a clear error when there is none."""
    d = directory or image_dir()
    try:
        rec = json.loads((d / RECORD).read_text())
        img = GuestImage(d / rec["kernel"], d / rec["initrd"], rec["version"])
    except (OSError, ValueError, KeyError):
        raise VmImageError(
            f"no guest image in {d}: build it with `make vm-image` (or `python -m omniwall.vm.image build`)"
        ) from None
    if not img.kernel.is_file() or not img.initrd.is_file():
        raise VmImageError(f"guest image in {d} is incomplete: rebuild it with `make vm-image`")
    return img


def build(directory: Path | None = None, *, force: bool = False) -> GuestImage:
    """Build the image into `directory` unless a complete one is there (then reuse it)."""
    d = directory or image_dir()
    if not force:
        try:
            return load(d)
        except VmImageError:
            pass
    if not BUSYBOX.is_file():
        raise VmImageError(f"{BUSYBOX} missing: install the Debian package busybox-static")
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="omniwall-vm-") as tmp:
        work = Path(tmp)
        deb = _download_kernel(work)
        root = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise VmImageError(f"{deb.name}: no /boot/vmlinuz-*")
        version = vmlinuz[0].name.removeprefix("vmlinuz-")
        kernel = d / f"vmlinux-{version}"
        kernel.write_bytes(extract_vmlinux(vmlinuz[0].read_bytes()))
        initrd = d / f"initrd-{version}.cpio"
        initrd.write_bytes(_initramfs(root / "lib" / "modules" / version))
    (d / RECORD).write_text(json.dumps({"kernel": kernel.name, "initrd": initrd.name, "version": version}))
    return load(d)


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz-compressed (Debian's)."""
    start = 0
    while (at := vmlinuz.find(XZ_MAGIC, start)) >= 0:
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(vmlinuz[at:])
        except lzma.LZMAError:
            start = at + 1
            continue
        if out.startswith(ELF_MAGIC):
            return out
        start = at + 1
    raise VmImageError("vmlinuz: no xz-compressed ELF payload found")


def _download_kernel(work: Path) -> Path:
    res = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True)
    names = [
        line.split(":", 1)[1].strip()
        for line in res.stdout.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if res.returncode != 0 or not names:
        raise VmImageError(
            f"apt-cache depends {KERNEL_META}: no kernel package found (run `apt-get update`?) "
            f"{res.stderr.strip()}"
        )
    _run(["apt-get", "download", "-q", names[0]], cwd=work)
    debs = sorted(work.glob(f"{names[0]}_*.deb"))
    if not debs:
        raise VmImageError(f"apt-get download {names[0]}: no .deb")
    return debs[0]


def _run(argv: list[str], cwd: Path | None = None) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if res.returncode != 0:
        raise VmImageError(f"{' '.join(argv)}: {res.stderr.strip() or f'exit {res.returncode}'}")


def _initramfs(moddir: Path) -> bytes:
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "lib", "lib/modules"):
        cpio.add(d, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    cpio.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    init = resources.files("omniwall.vm").joinpath("guest_init.sh").read_bytes()
    cpio.add("init", stat.S_IFREG | 0o755, init)
    for m in MODULES:
        found = list(moddir.rglob(f"{m}.ko")) + list(moddir.rglob(f"{m}.ko.xz"))
        if not found:
            raise VmImageError(f"kernel module {m} not found under {moddir}")
        data = found[0].read_bytes()
        if found[0].suffix == ".xz":
            data = lzma.decompress(data)
        cpio.add(f"lib/modules/{m}.ko", stat.S_IFREG | 0o644, data)
    return cpio.finish()


class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self._out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m omniwall.vm.image", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["build", "show"])
    ap.add_argument("--dir", type=Path, default=None, help="image directory (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if an image is there")
    args = ap.parse_args(argv)
    try:
        img = build(args.dir, force=args.force) if args.action == "build" else load(args.dir)
    except VmImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"kernel {img.kernel}\ninitrd {img.initrd}\nversion {img.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["GuestImage", "VmImageError", "build", "extract_vmlinux", "image_dir", "load"]
