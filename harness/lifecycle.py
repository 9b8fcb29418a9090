"""Guest-side steps and checks shared by the lifecycle scenarios (tests/vm/test_lifecycle.py,
tests/vm/test_set_unified_vm.py): the product's CLI is driven over SSH, and every check reads an
oracle that is not the product's own code where one exists.

- `Steps`: each scenario step timed (wall seconds), with the VM's boots and soft reboots so far and
  the root filesystem's used bytes (`df -B1 /sysroot`) after it, written to a JSON file after every
  step (a failed run keeps what it did; the qualification report reads it).
- `after_boot`: what every scenario checks after every (soft) reboot: the deployments `status`
  reports, `systemctl --failed` empty, `podman run <booted image>` with the guest's podman and no
  flags (and that it did not pull: the system store has no image of that name afterwards), and the
  zero-copy audit (harness.zerocopy_audit, in the guest) of every object new since the last audit.
- `disk_figures`: the qualification report's disk figures (image bytes, bootc store, repository
  extra, plain copy cost), measured in the guest, for a step's facts.
- `store_names`: a containers-storage's image names from its own `overlay-images/images.json`.
- `apply_and_reconnect`: run a verb that reboots the guest itself (`--apply`) and follow it through
  a soft or a hard reboot.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bootc_unified.deploy.sysroot import ESP_CHECK_UNIT
from harness.guestmodules import run_module, ship
from harness.ssh import SSHError
from harness.vm import Machine

REPO = "/sysroot/composefs"
BOOTC_STORE = "/sysroot/ostree/bootc/storage"
SYSTEM_STORE = "/var/lib/containers/storage"
LOG_DIR = "/var/tmp/bootc-unified-lifecycle"  # /var is shared by every deployment


# --- step records ------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    name: str
    seconds: float
    boots: int  # VM starts so far (each one boots a kernel)
    soft_reboots: int  # SoftRebootsCount of the current boot
    disk_used: int  # bytes used on the root filesystem (df -B1 /sysroot) after the step
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Steps:
    """One scenario's step records, rewritten to `path` (JSON) after every step."""

    vm: Machine
    path: Path
    scenario: str
    fs: str
    records: list[StepRecord] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time the body; the dict it yields is stored with the record (measurements, ids)."""
        facts: dict[str, Any] = {}
        started = time.monotonic()
        try:
            yield facts
        finally:
            seconds = time.monotonic() - started
            try:
                soft, used = self.vm.ssh.soft_reboots_count(), df_used(self.vm)
            except Exception:  # the guest is gone: the record still says how long the step ran
                soft, used = -1, -1
            self.records.append(StepRecord(name, round(seconds, 1), self.vm.boots, soft, used, facts))
            self.write()
            print(
                f"{self.scenario}[{self.fs}] {name}: {seconds:.0f}s, boots {self.vm.boots}, "
                f"used {used / 1e6:.0f} MB {json.dumps(facts)[:300]}"
            )

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"scenario": self.scenario, "fs": self.fs, "steps": [asdict(r) for r in self.records]}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(self.path)


# --- facts from the guest ------------------------------------------------------------------------------


ESP_TYPE = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
TEST_ESP = "/run/bootc-unified-test/esp"


def esp_device(vm: Machine) -> str:
    """The guest's ESP, found by its GPT type (as the product finds it)."""
    device = vm.run(
        f"lsblk -rno PATH,PARTTYPE | awk 'tolower($2) == \"{ESP_TYPE}\" {{print $1; exit}}'"
    ).stdout.strip()
    assert device, "no EFI system partition in the guest"
    return device


def wait_esp_check(vm: Machine) -> None:
    """The boot's ESP check finished (the boot does not wait for it; whatever mounts the ESP does,
    as the verbs do): `systemctl start` waits for a running oneshot and is a no-op after it ran.
    Fails when the check failed."""
    vm.run(["systemctl", "start", ESP_CHECK_UNIT])


def esp_check(vm: Machine) -> tuple[str, str]:
    """(what bootc-unified-esp-fsck.service said this boot, fsck.fat -n's verdict on the ESP now).
    The second is the oracle: dosfstools' own read-only check, asserted clean (the ESP unmounted:
    a mounted FAT carries its dirty bit)."""
    wait_esp_check(vm)
    device = esp_device(vm)
    assert not vm.run(["findmnt", "-n", "-S", device], check=False).ok, f"{device} is mounted"
    said = vm.run(f"journalctl -b -o cat -u {ESP_CHECK_UNIT} | grep '^ESP ' || true").stdout
    check = vm.run(["fsck.fat", "-n", device], check=False)
    assert check.ok, f"the ESP is damaged:\n{check.stdout}{check.stderr}"
    return said.strip(), check.stdout.strip().splitlines()[-1]


def mount_esp(vm: Machine) -> str:
    """Where the guest's ESP is mounted, mounting it (found by its GPT type, as the product finds
    it) at TEST_ESP when nothing has. The verbs mount it only in their own mount namespace."""
    found = vm.run(["findmnt", "-n", "-t", "vfat", "-o", "TARGET"], check=False).stdout.split()
    if found:
        return found[0]
    wait_esp_check(vm)
    device = esp_device(vm)
    vm.run(f"mkdir -p {TEST_ESP} && mount -t vfat {shlex.quote(device)} {TEST_ESP}")
    return TEST_ESP


def df_used(vm: Machine, path: str = "/sysroot") -> int:
    return int(vm.run(["df", "-B1", "--output=used", path]).stdout.split()[-1])


def du_bytes(vm: Machine, *paths: str) -> int:
    """Bytes `du` counts for `paths` together (one invocation: a hardlinked inode counts once)."""
    out = vm.run(["du", "-s", "-c", "-B1", "-x", *paths]).stdout
    return int(out.splitlines()[-1].split()[0])


def image_bytes(vm: Machine, ref: str) -> int | None:
    """The image's size as podman sees it (`podman image inspect`: its layers, uncompressed), from
    any store the guest's podman reads (the bootc store is an additional one); None when none
    holds it (a direct install before set-unified)."""
    got = vm.run(["podman", "image", "inspect", "--format", "{{.Size}}", ref], check=False)
    return int(got.stdout.strip()) if got.ok and got.stdout.strip().isdigit() else None


def disk_figures(vm: Machine, ref: str | None = None) -> dict[str, int]:
    """The disk figures the qualification report charts, for a step's facts: `image_bytes`
    (podman's view of `ref`, default the booted image), and from harness.diskuse in the guest
    (each inode and each physical extent once, so hardlinks and reflinks count once):
    `bootc_store_bytes` (BOOTC_STORE), `repository_extra_bytes` (what REPO adds to the store) and
    `plain_copy_bytes` (REPO's files with nothing shared: what a plain copy would take)."""
    ref = ref or entry_image(status(vm)["status"]["booted"])
    ship(vm)
    got: dict[str, int] = json.loads(run_module(vm, "diskuse", BOOTC_STORE, REPO, timeout=900))
    size = image_bytes(vm, ref) if ref else None
    return {**({"image_bytes": size} if size is not None else {}), **got}


def status(vm: Machine) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(vm.run(["bootc-unified", "status", "--format", "json"]).stdout)
    return doc


def entry_id(entry: dict[str, Any] | None) -> str | None:
    return None if entry is None else str(entry["composefs"]["verity"])


def entry_image(entry: dict[str, Any] | None) -> str | None:
    return None if entry is None else str(entry["image"]["image"]["image"])


def root_source_id(vm: Machine) -> str:
    """The booted deployment by what the kernel says: `/`'s mount source `composefs:<id>`."""
    source = vm.run(["findmnt", "-n", "-o", "SOURCE", "/"]).stdout.strip()
    assert source.startswith("composefs:"), source
    return source.removeprefix("composefs:")


def _store_records(vm: Machine, store: str, kind: str) -> list[dict[str, Any]]:
    """A containers-storage's own `overlay-<kind>/<kind>.json` (no podman, no product code)."""
    got = vm.run(["cat", f"{store}/overlay-{kind}/{kind}.json"], check=False)
    records: list[dict[str, Any]] = json.loads(got.stdout or "[]") if got.ok else []
    return records


def store_names(vm: Machine, store: str) -> dict[str, list[str]]:
    """image ID -> names, from the store's own images.json."""
    return {rec["id"]: list(rec.get("names") or []) for rec in _store_records(vm, store, "images")}


def layer_ids(vm: Machine, store: str) -> set[str]:
    """A containers-storage's layer IDs, from its own layers.json."""
    return {rec["id"] for rec in _store_records(vm, store, "layers")}


def all_names(vm: Machine, store: str) -> set[str]:
    return {n for names in store_names(vm, store).values() for n in names}


def objects(vm: Machine) -> set[str]:
    out = vm.run(["find", f"{REPO}/objects", "-type", "f", "-printf", "%P\\n"]).stdout
    return set(out.split())


def failed_units(vm: Machine) -> list[str]:
    vm.run("systemctl is-system-running --wait || true", timeout=vm.timeout(300))
    out = vm.run(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
    return [line for line in out.splitlines() if line.strip()]


def expect_status(
    vm: Machine,
    *,
    booted: str,
    staged: str | None = None,
    rollback: str | None = None,
    rollback_queued: bool = False,
) -> dict[str, Any]:
    """`status --format json` names these images (by `.image.image`) in the three slots; the booted
    entry's id is `/`'s mount source. Returns the document."""
    doc = status(vm)
    st = doc["status"]
    got = (entry_image(st["booted"]), entry_image(st["staged"]), entry_image(st["rollback"]))
    assert got == (booted, staged, rollback), (got, json.dumps(st)[:2000])
    assert entry_id(st["booted"]) == root_source_id(vm), st["booted"]
    assert st["rollbackQueued"] is rollback_queued, st
    return doc


def zero_copy_new(vm: Machine, fs: str, before: set[str]) -> dict[str, int]:
    """The zero-copy audit of the repository against the bootc store, restricted to objects not in
    `before`: each one is metadata (a stream or an EROFS image) or shares its data with a store
    file (same inode with st_nlink >= 2 on ext4; FIEMAP-shared extents on btrfs/XFS), or is btrfs
    inline. Returns counts over the new objects."""
    ship(vm)
    audit = json.loads(run_module(vm, "zerocopy_audit", REPO, BOOTC_STORE, timeout=900))
    new = {name for name in objects(vm) - before}
    prefix = f"{REPO}/objects/"
    counts: dict[str, int] = {}
    for kind in ("metadata", "hardlinked", "reflinked", "inline"):
        counts[kind] = sum(1 for p in audit[kind] if p.removeprefix(prefix) in new)
    bad = {p: why for p, why in audit["unaccounted"].items() if p.removeprefix(prefix) in new}
    assert bad == {}, list(bad.items())[:20]
    shared = counts["hardlinked"] if fs == "ext4" else counts["reflinked"]
    other = counts["reflinked"] if fs == "ext4" else counts["hardlinked"]
    assert other == 0, counts  # ext4 cannot reflink; btrfs/XFS get reflinks
    counts["new"] = len(new)
    counts["shared"] = shared
    return counts


def podman_run_booted(vm: Machine) -> str:
    """`podman run --rm <booted image> cat /usr/lib/os-release` with the guest's podman, no flags:
    equals the running system's file, and no copy of the image landed in the system store (a pull
    through the registry mapping would pass the run and fail this)."""
    ref = entry_image(status(vm)["status"]["booted"])
    assert ref is not None
    before = all_names(vm, SYSTEM_STORE)
    out = vm.run(["podman", "run", "--rm", ref, "cat", "/usr/lib/os-release"], timeout=vm.timeout(300)).stdout
    assert out == vm.run(["cat", "/usr/lib/os-release"]).stdout, out
    after = all_names(vm, SYSTEM_STORE)
    assert ref not in after - before, (
        f"podman pulled {ref} into {SYSTEM_STORE} instead of using the bootc store"
    )
    return ref


def after_boot(vm: Machine, fs: str, objects_before: set[str], **expected: Any) -> dict[str, Any]:
    """Every check after a (soft) reboot; `expected` as expect_status. Returns facts for the record."""
    doc = expect_status(vm, **expected)
    assert failed_units(vm) == [], failed_units(vm)
    podman_run_booted(vm)
    audit = zero_copy_new(vm, fs, objects_before)
    vm.check_console()
    return {"booted": entry_id(doc["status"]["booted"]), "audit": audit}


def read_progress(vm: Machine, path: str) -> list[dict[str, Any]]:
    text = vm.run(["cat", path]).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def last_pull(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The final ProgressBytes event of the pull (bootc's task "pulling")."""
    pulls = [e for e in events if e.get("type") == "ProgressBytes"]
    assert pulls, events[:5]
    return pulls[-1]


# --- verbs that reboot the guest themselves ---------------------------------------------------------------


def apply_and_reconnect(vm: Machine, command: list[str], name: str, timeout: float = 1800) -> tuple[str, str]:
    """Run `command` (e.g. `bootc-unified upgrade --apply ...`) detached in the guest, its output in
    LOG_DIR/<name>.log, and follow the guest through the reboot it starts: a soft reboot (the VM
    keeps running, SoftRebootsCount + 1, same boot_id) or a hard one (QEMU exits on reboot; it is
    started again). Returns ("soft"|"hard", the command's output)."""
    log, rc = f"{LOG_DIR}/{name}.log", f"{LOG_DIR}/{name}.rc"
    boot_id, soft = vm.boot_id(), vm.ssh.soft_reboots_count()
    inner = f"{shlex.join(command)} >{log} 2>&1; echo $? >{rc}"
    vm.run(f"mkdir -p {LOG_DIR} && rm -f {log} {rc}")
    vm.ssh.start(f"nohup sh -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + vm.timeout(timeout / 10)
    while True:  # until the connection drops; a command that ends without a reboot fails here
        try:
            got = vm.ssh.run(f"cat {rc} 2>/dev/null; true", timeout=30)
        except Exception:  # SSHError, paramiko's, OSError, EOFError: the guest went down
            vm.ssh.close()
            break
        code = got.stdout.strip()
        if code and code != "0":
            out = vm.run(["cat", log], check=False).stdout
            raise AssertionError(f"{shlex.join(command)} failed (exit {code}):\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{shlex.join(command)} did not reboot the guest within {timeout}s")
        time.sleep(2)
    limit = time.monotonic() + vm.timeout(120)
    while True:
        if not vm.is_running():  # a hard reboot: -no-reboot ended QEMU
            vm.check_console()
            vm.start()
            vm.wait_ssh()
            kind = "hard"
            break
        try:
            vm.ssh.connect(15, abort=vm.console_trouble)
            vm.verify_identity()
            vm.check_console()
            kind = "soft"
            break
        except SSHError:
            if time.monotonic() > limit:
                raise
    out = vm.run(["cat", log], check=False).stdout
    now_id, now_soft = vm.boot_id(), vm.ssh.soft_reboots_count()
    if kind == "soft":
        assert (now_id, now_soft) == (boot_id, soft + 1), (boot_id, now_id, soft, now_soft, out)
    else:
        assert now_id != boot_id, out
    return kind, out
