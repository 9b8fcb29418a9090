"""pytest plugin for the VM tier: guest images, disks, VMs.

Fixtures (the `registry` fixture and `fs_kind` parametrization come from harness.pytest_plugin):

    accel          session: KVM or TCG (probed; --accel / BOOTC_UNIFIED_ACCEL override)
    guest_image    session: guest_image("v1") -> GuestImage (cached build); .push(variant, registry)
    disk           a qcow2 overlay over the cached v1 base disk on `fs_kind`; disk_factory(variant, fs)
    vm             a booted Machine (SSH answers) on `disk`; vm_factory(disk, backend=None)
    installed_disk_factory(variant, fs, unified): an overlay over the cached *installed* system
                   (harness.installed: `install to-disk` in an installer VM on a cache miss)

Options: --user-image REF / --user-update-image REF (a user's image standing in for v1 / v2,
harness.userimages; scenarios skip their image-specific checks for it), --vm-backend
libvirt|qemu|mixed (mixed: XFS on plain QEMU, the others on libvirt, so one
run proves both backends without extra boots), --accel auto|kvm|tcg, --keep-vm-on-failure
(leaves the VM running and prints how to SSH in), --vm-artifacts DIR (default artifacts/vm).
Per test, DIR/<test>/ gets the console log, the guest journal, and the domain XML or QEMU command
line. At teardown every VM is destroyed and its console log checked (console.py), each step even
when an earlier one failed. Names, ports, disks and work directories are per test, so pytest-xdist
workers never share them; the image and disk caches take file locks.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import disks, installed, userimages
from harness.disks import BaseDisk, build_base_disk, overlay
from harness.images import GuestImage, ImageBuilder
from harness.pytest_plugin import require
from harness.registry import Registry
from harness.ssh import KeyPair, ensure_keypair
from harness.vm import (
    BACKENDS,
    Accel,
    Machine,
    MachineError,
    MachineSpec,
    create,
    detect,
    find_firmware,
    free_port,
)
from harness.vm import firmware as firmware_mod
from harness.vm import libvirtd as libvirtd_mod
from harness.vm import qemu as qemu_mod
from harness.vm.accel import CHOICES as ACCEL_CHOICES

BACKEND_ENV = "BOOTC_UNIFIED_VM_BACKEND"
MIXED = {"btrfs": "libvirt", "ext4": "libvirt", "xfs": "qemu"}
GUEST_MEMORY_MIB = 2048

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
# a test's machines (vm_factory's), for hooks that look at them: the --keep-vm-on-failure hint,
# harness.qualify.plugin's status evidence and boot timings
MACHINES = pytest.StashKey[list[Machine]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bootc-unified VM tier")
    group.addoption(
        "--vm-backend",
        choices=[*BACKENDS, "mixed"],
        default=os.environ.get(BACKEND_ENV, "mixed"),
        help=f"how VMs run (default: mixed = xfs on qemu, others on libvirt; env {BACKEND_ENV})",
    )
    group.addoption(
        "--accel",
        choices=ACCEL_CHOICES,
        default="auto",
        help="KVM or TCG; auto probes KVM with a short firmware boot (env BOOTC_UNIFIED_ACCEL)",
    )
    group.addoption(
        "--keep-vm-on-failure",
        action="store_true",
        default=False,
        help="leave a failed test's VM running and print how to SSH into it",
    )
    group.addoption(
        "--vm-artifacts", default=None, help="per-test VM artifacts directory (default artifacts/vm)"
    )
    group.addoption(
        "--user-image",
        metavar="REF",
        default=None,
        help="a user's image (derived from our base) standing in for v1 where a scenario takes one",
    )
    group.addoption(
        "--user-update-image",
        metavar="REF",
        default=None,
        help="a user's image standing in for v2 (the update) where a scenario takes one",
    )


# --- reports, so fixtures know whether their test failed ------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    if report.when == "call" and report.failed and item.config.getoption("--keep-vm-on-failure"):
        for machine in item.stash.get(MACHINES, []):
            if machine.is_running():
                report.sections.append(("kept VM", kept_vm_hint(machine)))
    return report


def kept_vm_hint(machine: Machine) -> str:
    kill = getattr(machine, "kill_hint", lambda: "")()
    return (
        f"VM {machine.spec.name} ({machine.backend}) is still running:\n"
        f"  {machine.ssh_hint()}\n"
        f"  console: {machine.spec.console_log}\n"
        f"  stop it: {kill}"
    )


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


# --- session: accelerator, key, images ------------------------------------------------------------


@pytest.fixture(scope="session")
def accel(pytestconfig: pytest.Config) -> Accel:
    require(qemu_mod.missing_prerequisites() + firmware_mod.missing_prerequisites(), "VMs")
    return detect(str(pytestconfig.getoption("--accel")))


@pytest.fixture(scope="session")
def ssh_keypair() -> KeyPair:
    require([] if shutil.which("ssh-keygen") else ["ssh-keygen (openssh-client)"], "the guest SSH key")
    return ensure_keypair()


# the variants a user's image can stand in for (--user-image, --user-update-image)
USER_VARIANTS = {"--user-image": "v1", "--user-update-image": "v2"}


@dataclass
class GuestImages:
    """guest_image("v1") builds (or reuses) a variant, or names the user's image standing in for it
    (`users`, harness.userimages); push() puts it into a registry once per session. Disks to boot
    (installer VMs, smoke) are always made from the built-in images (`builtin`)."""

    builder: ImageBuilder
    users: dict[str, userimages.UserImage] = field(default_factory=dict)
    _built: dict[str, GuestImage] = field(default_factory=dict)
    # (registry, reference) -> (image ID pushed there, pushed reference): a tag that now holds
    # another image (v2 pushed as the tag v1 had) is pushed again when v1 is asked for
    _pushed: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def __call__(self, variant: str) -> GuestImage:
        user = self.users.get(variant)
        if user is not None:
            key = f"user-{user.image_id[:16]}"
            return GuestImage(variant, user.ref, user.image_id, key, user.layers, 0.0)
        return self.builtin(variant)

    def builtin(self, variant: str) -> GuestImage:
        """The built-in image of `variant`, whatever a user's image stands in for it."""
        if variant not in self._built:
            self._built[variant] = self.builder.build(variant)
        return self._built[variant]

    def is_user(self, variant: str) -> bool:
        """Whether a user's image stands in for `variant`: its image-specific checks do not apply."""
        return variant in self.users

    def push(self, variant: str, registry: Registry, reference: str | None = None) -> str:
        """Push `variant` to `registry` (as `reference`, default bootc-unified/<variant>:latest)
        unless that tag holds it already; returns the reference as the *guest* sees it
        (10.0.2.2:PORT/...)."""
        image = self(variant)
        key = (registry.address, reference or image.repository() + ":latest")
        pushed = self._pushed.get(key)
        if pushed is None or pushed[0] != image.image_id:
            user = self.users.get(variant)
            if user is not None:
                target = reference or image.repository() + ":latest"
                pushed = (image.image_id, userimages.copy(user, registry.address, target))
            else:
                pushed = (image.image_id, self.builder.push(image, registry.address, reference))
            self._pushed[key] = pushed
        return guest_reference(pushed[1])

    def push_derived(self, tag: str, registry: Registry, reference: str) -> None:
        """Push an image that is no built variant (a scenario's own, e.g. power-cut's derived
        updates) as `reference`, and record it: a later push() of a variant to that reference then
        pushes again instead of trusting that the tag still holds the variant (the session's
        registry is shared by every test on the worker)."""
        self.builder.buildah.push(tag, f"docker://{registry.address}/{reference}")
        self._pushed[(registry.address, reference)] = (f"derived:{tag}", reference)


def guest_reference(host_reference: str) -> str:
    """127.0.0.1:PORT/repo:tag as seen from inside a guest on QEMU user networking."""
    return re.sub(r"^(127\.0\.0\.1|localhost):", "10.0.2.2:", host_reference)


def images_missing() -> list[str]:
    tools = {"mmdebstrap": "mmdebstrap", "buildah": "buildah", "busybox": "busybox-static"}
    return [
        f"{tool} not found (Debian package {pkg})"
        for tool, pkg in tools.items()
        if shutil.which(tool) is None
    ]


def user_images(config: pytest.Config) -> dict[str, userimages.UserImage]:
    """The user's images named by --user-image / --user-update-image, by the variant they replace."""
    users = {}
    for option, variant in USER_VARIANTS.items():
        ref = config.getoption(option, default=None)
        if ref:
            try:
                users[variant] = userimages.inspect(str(ref))
            except userimages.UserImageError as e:
                pytest.fail(f"{option}: {e}", pytrace=False)
    return users


@pytest.fixture(scope="session")
def guest_image(ssh_keypair: KeyPair, pytestconfig: pytest.Config) -> GuestImages:
    require(images_missing() + ([] if os.geteuid() == 0 else ["root"]), "guest images")
    return GuestImages(ImageBuilder(public_key=ssh_keypair.public), user_images(pytestconfig))


# --- per test: disks and VMs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    base: BaseDisk | installed.InstalledBase
    path: Path  # this test's qcow2 overlay

    @property
    def fs(self) -> str:
        return self.base.fs


DiskFactory = Callable[[str, str], Disk]


@pytest.fixture
def disk_factory(guest_image: GuestImages, tmp_path: Path) -> DiskFactory:
    """disk_factory(variant, fs): a fresh overlay over the cached base disk of that built-in image
    and fs (a user's image standing in for the variant is installed, never booted as a disk)."""
    counter = iter(range(1_000_000))

    def factory(variant: str, fs: str) -> Disk:
        require(disks.missing_prerequisites(fs), f"a {fs} guest disk")
        base = build_base_disk(guest_image.builder, guest_image.builtin(variant), fs)
        return Disk(base, overlay(base, tmp_path / "disks" / f"{variant}-{fs}-{next(counter)}.qcow2"))

    return factory


@pytest.fixture
def disk(fs_kind: str, disk_factory: DiskFactory) -> Disk:
    """The v1 image on a disk whose root filesystem is `fs_kind`, as this test's own overlay."""
    return disk_factory("v1", fs_kind)


def backend_for(config: pytest.Config, fs: str) -> str:
    choice = str(config.getoption("--vm-backend"))
    return MIXED.get(fs, "libvirt") if choice == "mixed" else choice


def _require_backend(backend: str) -> None:
    if backend == "libvirt":
        require(libvirtd_mod.missing_prerequisites(), "the libvirt VM backend")


def slug(nodeid: str) -> str:
    """A test's artifacts directory name: its node id with anything but [A-Za-z0-9_.-] as `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[-120:]


def artifacts_dir(request: pytest.FixtureRequest) -> Path:
    option = request.config.getoption("--vm-artifacts")
    root = Path(option) if option else Path(request.config.rootpath) / "artifacts" / "vm"
    return root / slug(request.node.nodeid)


VmFactory = Callable[..., Machine]


@pytest.fixture
def vm_factory(
    request: pytest.FixtureRequest, accel: Accel, ssh_keypair: KeyPair, tmp_path: Path
) -> Iterator[VmFactory]:
    """vm_factory(disk, backend=None, boot=True, extra_disks=()): a machine on `disk` (extra qcow2
    disks appear as /dev/vdb, ...); destroyed at teardown (kept running with --keep-vm-on-failure
    when the test failed). Artifacts are saved either way."""
    machines: list[Machine] = []
    request.node.stash[MACHINES] = machines
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")

    def factory(
        disk: Disk, backend: str | None = None, boot: bool = True, extra_disks: tuple[Path, ...] = ()
    ) -> Machine:
        chosen = backend or backend_for(request.config, disk.fs)
        _require_backend(chosen)
        name = f"bootc-unified-{worker}-{os.getpid()}-{len(machines)}"
        spec = MachineSpec(
            name=name,
            disk=disk.path,
            workdir=tmp_path / "vm" / name,
            accel=accel,
            firmware=find_firmware(),
            ssh_port=free_port(),
            ssh_key=ssh_keypair.private,
            memory_mib=GUEST_MEMORY_MIB,
            # Under TCG one vCPU: with two, the trixie guest kernel now and then dies of what
            # looks like cross-CPU code patching under MTTCG (an int3 Oops, a double fault in
            # __kmalloc with impossible EFLAGS), and the host has only two cores for two VMs.
            cpus=2 if accel.name == "kvm" else 1,
            extra_disks=extra_disks,
        )
        machine = create(chosen, spec)
        machines.append(machine)
        if boot:
            machine.boot()
        return machine

    yield factory

    keep = _failed(request.node) and request.config.getoption("--keep-vm-on-failure")
    directory = artifacts_dir(request)
    errors = finish_machines(
        machines, lambda m: directory / (m.spec.name if len(machines) > 1 else ""), keep=keep
    )
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise TeardownError(errors)


class TeardownError(Exception):
    """More than one thing went wrong while finishing a test's VMs; names them all."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        listed = "\n".join(f"- {type(e).__name__}: {e}" for e in errors)
        super().__init__(f"{len(errors)} problems while finishing the test's VMs:\n{listed}")


def finish_machines(
    machines: list[Machine], artifacts: Callable[[Machine], Path], *, keep: bool
) -> list[Exception]:
    """Save each machine's artifacts, destroy it (unless `keep`), then check every console log.
    Every step runs whatever failed before it (a VM that cannot be destroyed still gets its console
    checked); returns what failed, in order."""
    errors: list[Exception] = []
    for machine in machines:
        try:
            machine.save_artifacts(artifacts(machine))
        except Exception as e:
            errors.append(e)
        if not keep:
            try:
                machine.destroy()
            except Exception as e:
                failure = MachineError(f"destroying {machine.spec.name} ({machine.backend}) failed: {e}")
                failure.__cause__ = e
                errors.append(failure)
    for machine in machines:
        try:
            machine.check_console()
        except Exception as e:
            errors.append(e)
    return errors


@pytest.fixture
def vm(disk: Disk, vm_factory: VmFactory) -> Machine:
    """A booted v1 guest on `fs_kind`, SSH answering."""
    return vm_factory(disk)


InstalledDiskFactory = Callable[[str, str, bool], Disk]


@pytest.fixture
def installed_disk_factory(
    guest_image: GuestImages,
    registry: Registry,
    disk_factory: DiskFactory,
    vm_factory: VmFactory,
    tmp_path: Path,
) -> InstalledDiskFactory:
    """installed_disk_factory(variant, fs, unified): this test's overlay over the installed system
    of `variant` on `fs`, following `installed.variant_ref(variant)` (bootc-unified.test/...);
    installs it (installer VM on the v1 disk, target /dev/vdb) when the cache has none for the
    variant's current image ID."""
    counter = iter(range(1_000_000))

    def factory(variant: str, fs: str, unified: bool) -> Disk:
        image = guest_image(variant)
        base = installed.cached(image.image_id, fs, unified)
        if base is None:
            target = installed.blank_disk(
                tmp_path / "disks" / f"install-{variant}-{fs}-{next(counter)}.qcow2"
            )
            installer = vm_factory(disk_factory("v1", fs), extra_disks=(target,))
            guest_image.push(variant, registry, installed.REFERENCES[variant])
            installed.run_install(installer, installed.variant_ref(variant), fs, unified, registry.address)
            installer.poweroff()
            base = installed.save(target, image.image_id, fs, unified)
        dest = tmp_path / "disks" / f"installed-{variant}-{fs}-{next(counter)}.qcow2"
        return Disk(base, installed.overlay(base, dest))

    return factory
