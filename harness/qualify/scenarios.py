"""The scenario registry: the one table that `bootc-unified-qualify`, tmt's metadata
(tests/vm/main.fmf) and the report read.

A scenario is a name for one or more VM-tier pytest functions (tests/vm), run once per filesystem
through the `fs_kind` parametrization (node ids like `test_lifecycle[ext4]`). `covers` are the
verbs and features a scenario proves; `--scenario upgrade` selects the scenario that covers it
(lifecycle). `qualify` marks the default set: the release question ("does this image install,
update, roll back and GC correctly, zero-copy?") plus smoke, whose bare boot-to-SSH time is the
unit of P5. The others are harness and product self-tests, selectable by name.

`expected_seconds` are wall times per filesystem measured on the project's CI host (TCG, 1-vCPU
guests, 2 host cores shared with other runs: +-30%), including a cold install where the scenario
starts from a cached installed disk; the live progress shows them as "expected".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FILESYSTEMS = ("btrfs", "xfs", "ext4")


class UnknownScenario(ValueError):
    pass


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str  # one line, at most 50 characters (tmt's limit)
    description: str
    nodes: tuple[str, ...]  # pytest node ids (file or file::function), relative to the project root
    covers: tuple[str, ...] = ()
    filesystems: tuple[str, ...] = FILESYSTEMS  # where it runs (an @pytest.mark.fs narrows it)
    expected_seconds: float = 300.0  # per filesystem, TCG
    qualify: bool = False  # in the default set of `bootc-unified-qualify`
    # the built-in images a user's image can stand in for here (v1: --image, v2: --update-image);
    # the scenario then skips its checks specific to the built-in image
    user_images: tuple[str, ...] = ()

    def owns(self, nodeid: str) -> bool:
        """Whether a collected test (`file::function[param]`) belongs to this scenario."""
        base = nodeid.split("[", 1)[0]
        return any(base == node or base.startswith(f"{node}::") for node in self.nodes)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "smoke",
        "Boot, reboot and soft-reboot a v1 guest",
        "Boot v1 through OVMF + systemd-boot; root fs, fs-verity, podman pull/run, reboot, soft reboot",
        ("tests/vm/test_smoke.py::test_smoke",),
        covers=("boot", "reboot"),
        expected_seconds=120,
        qualify=True,
    ),
    Scenario(
        "install",
        "install to-disk, boot from composefs, zero-copy",
        "install to-disk --experimental-unified-storage from podman, boot it from composefs, zero-copy",
        ("tests/vm/test_install.py::test_install_to_disk",),
        covers=("install", "status"),
        expected_seconds=600,
        qualify=True,
        user_images=("v1",),
    ),
    Scenario(
        "lifecycle",
        "upgrade, switch, gc, rollback, bound images",
        "Installed v1: upgrade v2, switch alt, gc, rollback, staged drop, bound images, after every boot",
        ("tests/vm/test_lifecycle.py::test_lifecycle",),
        covers=("upgrade", "switch", "rollback", "gc", "lbi"),
        expected_seconds=1500,
        qualify=True,
    ),
    Scenario(
        "update",
        "Upgrade to another image, roll back: any images",
        "Installed v1: upgrade to v2, zero-copy, podman run, rollback; generic checks only (user images)",
        ("tests/vm/test_update.py::test_update",),
        covers=("user-update",),
        expected_seconds=600,
        user_images=("v1", "v2"),
    ),
    Scenario(
        "set-unified",
        "image set-unified, then a soft-reboot upgrade",
        "image set-unified on a direct install (deduped), then upgrade --soft-reboot=auto",
        ("tests/vm/test_set_unified_vm.py::test_set_unified_vm",),
        covers=("set-unified", "soft-reboot"),
        expected_seconds=900,
        qualify=True,
    ),
    Scenario(
        "zstd-chunked",
        "zstd:chunked partial pull, zero-copy import",
        "zstd:chunked partial pull into the bootc store and a zero-copy import, in the guest",
        ("tests/vm/test_zstd_chunked_vm.py::test_zstd_chunked_partial_pull_and_import",),
        covers=("zstd-chunked", "partial-pull"),
        expected_seconds=150,
        qualify=True,
    ),
    Scenario(
        "power-cut",
        "Power cuts during upgrade and finalize",
        "VM destroyed at random times in upgrade and in finalize; boots old or new, fsck clean, re-run works",
        (
            "tests/vm/test_power_cut.py::test_power_cut",
            "tests/vm/test_esp_swap.py::test_the_entries_swap_is_on_disk_before_the_old_set_goes",
        ),
        covers=("power-cut", "crash"),
        expected_seconds=1800,
        qualify=True,
    ),
    Scenario(
        "tamper",
        "Tampered object and EROFS image are caught",
        "Bytes changed on disk: EIO under verity, fsck names the object, a tampered image fails to boot",
        ("tests/vm/test_tamper.py::test_tamper",),
        covers=("tamper", "integrity"),
        expected_seconds=900,
    ),
    Scenario(
        "boot-composefs",
        "A hand-made deployment boots from composefs",
        "A deployment made by hand boots from composefs (the boot path without install)",
        ("tests/vm/test_boot_composefs.py::test_boot_composefs",),
        covers=("boot-path",),
        filesystems=("ext4",),
        expected_seconds=300,
    ),
    Scenario(
        "verity-repository",
        "A verity repository in the guest, measured",
        "A verity repository in the guest: fs-verity enabled and measured on every object",
        ("tests/vm/test_verity_repository.py::test_verity_repository",),
        covers=("verity",),
        filesystems=("btrfs", "ext4"),
        expected_seconds=180,
    ),
    Scenario(
        "verity-guest",
        "fs-verity in the guest kernel vs userspace",
        "fs-verity enable/measure in the guest kernel equals the userspace digest",
        ("tests/vm/test_verity_guest.py::test_enable_and_measure_in_guest",),
        covers=("verity",),
        filesystems=("btrfs", "ext4"),
        expected_seconds=120,
    ),
    Scenario(
        "images",
        "Guest images build, share layers and boot",
        "Guest images: definitions, shared layers, v1 -> v2 changes, build cache, bootable disks",
        ("tests/vm/test_images.py",),
        covers=("images",),
        expected_seconds=120,
    ),
    Scenario(
        "harness-vm",
        "VM harness: identity checks, KVM/TCG decision",
        "The VM harness against real guests: SSH into another VM is caught, KVM/TCG decision",
        ("tests/vm/test_harness_vm.py",),
        covers=("harness",),
        expected_seconds=240,
    ),
)

BY_NAME = {s.name: s for s in SCENARIOS}
DEFAULT = tuple(s.name for s in SCENARIOS if s.qualify)


def _check_registry() -> None:
    names = [s.name for s in SCENARIOS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AssertionError(f"scenario registry: duplicate names {duplicates}")
    for s in SCENARIOS:
        unknown = set(s.filesystems) - set(FILESYSTEMS)
        if unknown or not s.nodes:
            raise AssertionError(f"scenario {s.name}: bad filesystems {sorted(unknown)} or no nodes")


_check_registry()


def resolve(names: Iterable[str]) -> list[Scenario]:
    """Scenarios by name or by what they cover (`upgrade` -> lifecycle), in registry order,
    each once; `all` is every scenario. Raises UnknownScenario naming the first unknown name."""
    wanted: set[str] = set()
    for name in names:
        if name == "all":
            wanted.update(BY_NAME)
        elif name in BY_NAME:
            wanted.add(name)
        else:
            owners = [s.name for s in SCENARIOS if name in s.covers]
            if not owners:
                raise UnknownScenario(
                    f"unknown scenario {name!r}; choose from {', '.join(BY_NAME)}, all "
                    f"(or what one covers: {', '.join(sorted(covered()))})"
                )
            wanted.update(owners)
    return [s for s in SCENARIOS if s.name in wanted]


def taking(variant: str) -> list[Scenario]:
    """The scenarios a user's image can stand in for `variant` in (v1: --image, v2: --update-image)."""
    return [s for s in SCENARIOS if variant in s.user_images]


def covered() -> set[str]:
    return {c for s in SCENARIOS for c in s.covers} - set(BY_NAME)


def owner(nodeid: str) -> Scenario | None:
    """The scenario a collected test belongs to."""
    return next((s for s in SCENARIOS if s.owns(nodeid)), None)


def fs_of(nodeid: str) -> str | None:
    """The filesystem of a test parametrized over `fs_kind` (its id is the filesystem's name)."""
    if nodeid.endswith("]"):
        param = nodeid.rsplit("[", 1)[-1].rstrip("]")
        for part in param.split("-"):
            if part in FILESYSTEMS:
                return part
    return None
