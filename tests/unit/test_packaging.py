"""The Debian package and the wheel (issue 13, "Packaging"): `packaging/deb/build-deb` builds it once per
session into a temporary directory; the checks read it without installing it on this machine
(`dpkg-deb -x` into a temporary root, never `dpkg -i`).

`make test` checks the quick build (`build-deb --no-deps`: the environment holds omniwall alone, and
`omniwall --version` borrows this checkout's venv for the dependencies); `make deb-check`
(OMNIWALL_DEB_FULL=1) runs the same checks on the full package, whose environment needs nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "packaging" / "deb" / "build-deb"
UNITS = ("omniwall-manager.service", "omniwall-agent.service")
VENV = "usr/lib/omniwall/venv"
FULL = os.environ.get("OMNIWALL_DEB_FULL") == "1"

pytestmark = [pytest.mark.timeout(1200 if FULL else 600)]


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Makefile APT_PACKAGES; `make install` as root)")


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("dpkg-deb", "strip")
    out = tmp_path_factory.mktemp("deb")
    args = [str(BUILD), *([] if FULL else ["--no-deps"]), str(out)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=1100)
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out
    return path


@pytest.fixture(scope="session")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_control_depends_on_the_kernel_tools_and_its_python(deb: Path) -> None:
    depends = {d.strip().split()[0] for d in _field(deb, "Depends").split(",")}
    py = "python{}.{}".format(*sys.version_info[:2])
    assert {"nftables", "libnftables1", "conntrack", "python3", py} <= depends
    assert _field(deb, "Package") == "omniwall"
    assert (
        _field(deb, "Architecture")
        == subprocess.check_output(["dpkg", "--print-architecture"], text=True).strip()
    )


def test_contents(deb: Path, unpacked: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    # every file root's: built with --root-owner-group, whoever ran the build
    owners = {line.split()[1] for line in listing.splitlines()}
    assert owners == {"root/root"}
    for unit in UNITS:
        assert (unpacked / "lib/systemd/system" / unit).is_file()
    for cfg in ("manager.yaml", "agent.yaml"):
        assert (unpacked / "etc/omniwall" / cfg).is_file()
    cmd = unpacked / "usr/bin/omniwall"
    assert cmd.is_symlink() and os.readlink(cmd) == "../lib/omniwall/venv/bin/omniwall"
    assert (unpacked / VENV / "bin/omniwall").is_file()
    assert (unpacked / "usr/share/doc/omniwall/copyright").is_file()
    assert (unpacked / "usr/share/doc/omniwall/install.md").is_file()
    # no byte code (postinst compiles), no pip, no path of the build machine
    assert not list(unpacked.rglob("__pycache__"))
    assert not (unpacked / VENV / "bin/pip").exists()
    site = _site_packages(unpacked)
    assert sorted(p.name for p in (site / "omniwall/examples").iterdir()) == sorted(
        p.name for p in (ROOT / "examples").iterdir()
    )
    # build-deb stages under a temporary omniwall-deb.XXXXXX directory: none of its paths may remain
    leftovers = subprocess.run(
        ["grep", "-rlI", "/omniwall-deb.", str(unpacked)], capture_output=True, text=True
    )
    assert leftovers.stdout == "", f"build paths inside the package: {leftovers.stdout}"


def test_conffiles_are_the_sample_configuration(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "DEBIAN")], check=True)
    conffiles = (tmp_path / "DEBIAN/conffiles").read_text().split()
    assert conffiles == ["/etc/omniwall/agent.yaml", "/etc/omniwall/manager.yaml"]
    for script in ("postinst", "prerm", "postrm"):
        res = subprocess.run(["sh", "-n", str(tmp_path / "DEBIAN" / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_lintian_has_no_errors_and_every_override_has_a_reason(deb: Path) -> None:
    _need("lintian")
    res = subprocess.run(["lintian", "--fail-on", "error", str(deb)], capture_output=True, text=True)
    errors = [line for line in res.stdout.splitlines() if line.startswith("E:")]
    assert res.returncode == 0 and not errors, res.stdout + res.stderr
    # overrides come in groups (blank-line separated), each opened by the comment that says why
    groups = (ROOT / "packaging/deb/lintian-overrides").read_text().split("\n\n")
    for group in groups:
        lines = [line for line in group.splitlines() if line.strip()]
        if any(not line.startswith("#") for line in lines):
            assert lines[0].startswith("#"), f"override without a reason: {lines[0]}"


def _site_packages(root: Path) -> Path:
    (site,) = (root / VENV / "lib").glob("python3.*/site-packages")
    return site


def _run_packaged(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the package's interpreter from the unpacked tree. The quick build's environment lacks the
    dependencies: they come from this checkout's venv, after the package's own site-packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = "/usr/bin:/bin"
    if not FULL:
        env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    py = root / VENV / "bin/python3"
    return subprocess.run([str(py), *args], capture_output=True, text=True, env=env, timeout=120)


def test_omniwall_version_from_the_unpacked_package(unpacked: Path) -> None:
    res = _run_packaged(unpacked, str(unpacked / VENV / "bin/omniwall"), "--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"omniwall {_version()}"
    res = _run_packaged(unpacked, "-c", "import omniwall.cli.main, omniwall; print(omniwall.__file__)")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).is_relative_to(_site_packages(unpacked)), res.stdout


def test_demo_finds_its_examples_in_the_installed_package(unpacked: Path) -> None:
    """The wheel carries examples/ (pyproject package data): the offline demo runs from the package."""
    res = _run_packaged(unpacked, "-c", "from omniwall.demo import EXAMPLE_DIR; print(EXAMPLE_DIR)")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).is_relative_to(_site_packages(unpacked))
    res = _run_packaged(unpacked, "-m", "omniwall.demo", "--offline")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "tenant-a: web -> app" in res.stdout


def _version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _verify_root(unpacked: Path, tmp_path: Path) -> Path:
    """A root for `systemd-analyze verify --root`: the package's files plus this machine's own units
    (the targets the units name) and kill (ExecReload). No running systemd is needed."""
    root = tmp_path / "root"
    shutil.copytree(unpacked, root, symlinks=True)
    # a merged-/usr root, like this machine's: the package's /lib/systemd/system is /usr/lib's
    units = root / "usr/lib/systemd/system"
    shutil.copytree("/usr/lib/systemd/system", units, symlinks=True, dirs_exist_ok=True)
    for unit in UNITS:
        shutil.copy(unpacked / "lib/systemd/system" / unit, units / unit)
    shutil.rmtree(root / "lib")
    (root / "lib").symlink_to("usr/lib")
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(shutil.which("kill") or "/bin/kill", root / "bin/kill")
    return root


def test_units_verify(unpacked: Path, tmp_path: Path) -> None:
    _need("systemd-analyze")
    root = _verify_root(unpacked, tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *UNITS], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys too: any line it prints is a finding
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_units_verify_catches_a_broken_unit(unpacked: Path, tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a missing command are reported."""
    _need("systemd-analyze")
    root = _verify_root(unpacked, tmp_path)
    unit = root / "usr/lib/systemd/system" / UNITS[1]
    unit.write_text(
        unit.read_text().replace("ProtectHome=", "ProtectHom=").replace("/usr/bin/omniwall", "/usr/bin/nope")
    )
    res = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", UNITS[1]], capture_output=True, text=True
    )
    out = res.stdout + res.stderr
    assert "ProtectHom" in out and "/usr/bin/nope" in out


def test_units_hardening_exposure(unpacked: Path, tmp_path: Path) -> None:
    """systemd's own exposure score (0 safe .. 10 unsafe) stays low: the agent keeps CAP_NET_ADMIN only,
    the manager runs as a dynamic user with no capability at all."""
    _need("systemd-analyze")
    root = _verify_root(unpacked, tmp_path)
    for unit, limit in (("omniwall-manager.service", 2.0), ("omniwall-agent.service", 3.0)):
        res = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", f"--root={root}", unit],
            capture_output=True,
            text=True,
        )
        score = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout)
        assert res.returncode == 0 and score, res.stdout[-2000:] + res.stderr
        assert float(score[1]) <= limit, res.stdout
        text = (unpacked / "lib/systemd/system" / unit).read_text()
        assert "Type=notify" in text and re.search(r"^Restart=", text, re.M)
    agent = (unpacked / "lib/systemd/system/omniwall-agent.service").read_text()
    assert re.search(r"^CapabilityBoundingSet=CAP_NET_ADMIN$", agent, re.M)
