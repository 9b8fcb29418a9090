"""Power cuts (issue 12, R2): the VM is destroyed (QEMU killed / libvirt `destroy`: no guest
shutdown, no sync, the guest's page cache is lost) at a random time while `upgrade` runs, or
while the finalize unit runs at shutdown, and the machine must come back whole.

- `derived_image`: the update each trial stages: a base image plus one layer of random files, so
  every trial pulls, imports and builds an EROFS image of its own (a few MiB, new objects).
- `cut_upgrade`: `bootc-unified upgrade` started in the guest, the VM destroyed `at` seconds later.
- `reboot_watching_finalize` / `cut_finalize`: `systemctl reboot`, the serial console followed for
  the finalize unit's "Stopping ..." line (systemd prints it when the unit's stop job, the
  finalize, begins) and its "Stopped ..." line; the clean one measures finalize, the cut one
  destroys the VM `delay` seconds after "Stopping".
- `check_whole`: what must hold after every cut (the oracles are the kernel's mount table, the
  ESP's BLS entries and the repository's own files, besides `status`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any

from harness.images.build import GuestImage, ImageBuilder
from harness.lifecycle import (
    LOG_DIR,
    REPO,
    entry_id,
    entry_image,
    esp_check,
    failed_units,
    mount_esp,
    root_source_id,
    status,
)
from harness.vm import Machine
from harness.vm.console import ANSI

FINALIZE = "finalize the staged deployment"  # the finalize unit's Description, as systemd prints it
PAYLOAD_FILES = 8
PAYLOAD_BYTES = 2 << 20  # each: random, so each file is an object of its own


@dataclass
class Cut:
    """One power cut: what was cut, when, and what booted afterwards."""

    kind: str  # "upgrade" (during the verb) or "finalize" (during the finalize unit at shutdown)
    at: float  # seconds after the verb started / after finalize's "Stopping" line
    window: float  # the random range [0, window] `at` was drawn from
    booted_before: str
    staged: str  # the deployment (id) or image being staged
    booted_after: str = ""
    outcome: str = ""  # "old" or "new"
    finished_before_cut: bool = False  # the verb / finalize had ended when the VM was destroyed
    progress: str = ""  # the verb's last output line that reached the disk (upgrade cuts)
    boot_seconds: float = 0.0  # start to SSH after the cut
    fsck: str = ""
    esp: str = ""  # what bootc-unified-esp-fsck.service said at the boot after the cut
    recovered: str = ""  # what bootc-unified-recover.service said (an interrupted repository write)


def derived_image(builder: ImageBuilder, base: GuestImage, trial: int) -> str:
    """`base` plus one layer of PAYLOAD_FILES random files under /usr/share/bootc-unified/power-cut;
    returns its tag in the build store (remove it with `remove_image`)."""
    container = builder.buildah.from_(base.tag)
    tag = f"localhost/bootc-unified/power-cut:{trial}"
    try:
        with builder.buildah.mounted(container) as root:
            where = root / "usr/share/bootc-unified/power-cut"
            where.mkdir(parents=True, exist_ok=True)
            (where / "trial").write_text(f"{trial}\n")
            for i in range(PAYLOAD_FILES):
                (where / f"payload-{i}").write_bytes(os.urandom(PAYLOAD_BYTES))
        builder.buildah.commit(container, tag)
    except BaseException:
        builder.buildah.remove_container(container)
        raise
    return tag


def remove_image(builder: ImageBuilder, tag: str) -> None:
    builder.buildah("rmi", "--force", tag)


# --- the console ------------------------------------------------------------------------------------


def console_mark(vm: Machine) -> int:
    return len(vm.console_text())


def console_since(vm: Machine, mark: int) -> list[str]:
    text = vm.console_text()[mark:]
    return [ANSI.sub("", line).replace("\r", "") for line in text.splitlines()]


def wait_console(vm: Machine, mark: int, needle: str, timeout: float) -> bool:
    """Whether a console line written after `mark` contains all of `needle`'s words, within `timeout`."""
    words = needle.split()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(all(w in line for w in words) for line in console_since(vm, mark)):
            return True
        if not vm.is_running():
            return any(all(w in line for w in words) for line in console_since(vm, mark))
        time.sleep(0.2)
    return False


# --- cuts -----------------------------------------------------------------------------------------------


def start_upgrade(vm: Machine, name: str) -> None:
    """`bootc-unified upgrade` detached in the guest; output in LOG_DIR/<name>.log, status in .rc."""
    log, rc = f"{LOG_DIR}/{name}.log", f"{LOG_DIR}/{name}.rc"
    inner = f"bootc-unified upgrade >{log} 2>&1; echo $? >{rc}"
    vm.run(f"mkdir -p {LOG_DIR} && rm -f {log} {rc}")
    vm.ssh.start(f"nohup sh -c {shlex.quote(inner)} </dev/null >/dev/null 2>&1 &")


def upgrade_finished(vm: Machine, name: str) -> bool:
    got = vm.ssh.run(f"cat {LOG_DIR}/{name}.rc 2>/dev/null; true", timeout=30)
    return got.stdout.strip() != ""


def cut_upgrade(vm: Machine, cut: Cut, name: str) -> None:
    """Start `upgrade`, destroy the VM `cut.at` seconds later, boot it again."""
    start_upgrade(vm, name)
    started = time.monotonic()
    if cut.at > 3.0:  # a look at whether it ended, shortly before the cut
        time.sleep(cut.at - 2.0)
        with contextlib.suppress(Exception):  # the answer is information only
            cut.finished_before_cut = upgrade_finished(vm, name)
    time.sleep(max(0.0, cut.at - (time.monotonic() - started)))
    vm.destroy()
    restart(vm, cut)
    got = vm.run(f"tail -n 1 {LOG_DIR}/{name}.log 2>/dev/null; true")
    cut.progress = got.stdout.strip()[-200:]


def restart(vm: Machine, cut: Cut) -> None:
    vm.wait_stopped(vm.timeout(60))
    vm.start()
    cut.boot_seconds = round(vm.wait_ssh(), 1)


def _trigger_reboot(vm: Machine) -> int:
    mark = console_mark(vm)
    vm.ssh.start("sleep 1; systemctl reboot")
    vm.ssh.close()
    return mark


def reboot_watching_finalize(vm: Machine) -> float:
    """A clean reboot with a staged deployment; returns how long finalize ran (console "Stopping"
    to "Stopped", as the host saw the lines arrive)."""
    mark = _trigger_reboot(vm)
    assert wait_console(vm, mark, f"Stopping {FINALIZE}", vm.timeout(120)), "finalize never started"
    began = time.monotonic()
    assert wait_console(vm, mark, f"Stopped {FINALIZE}", vm.timeout(600)), "finalize never ended"
    took = time.monotonic() - began
    vm.wait_stopped(vm.timeout(120))
    vm.check_console()
    vm.start()
    vm.wait_ssh()
    return took


def cut_finalize(vm: Machine, cut: Cut) -> None:
    """Reboot; destroy the VM `cut.at` seconds after finalize began; boot it again."""
    mark = _trigger_reboot(vm)
    assert wait_console(vm, mark, f"Stopping {FINALIZE}", vm.timeout(120)), "finalize never started"
    time.sleep(cut.at)
    cut.finished_before_cut = any(FINALIZE in line and "Stopped" in line for line in console_since(vm, mark))
    vm.destroy()
    restart(vm, cut)


# --- after a cut ------------------------------------------------------------------------------------------


def bls_deployments(vm: Machine) -> list[str]:
    """The deployment ids the ESP's loader/entries name (`composefs=` in `options`), in file order."""
    esp = mount_esp(vm)
    text = vm.run(f"cat {esp}/loader/entries/*.conf").stdout
    ids = []
    for line in text.splitlines():
        if line.startswith("options "):
            args = [a for a in line.split()[1:] if a.startswith("composefs=")]
            assert len(args) == 1, line
            ids.append(args[0].removeprefix("composefs=").lstrip("?"))
    return ids


def fsck(vm: Machine) -> str:
    """The repository's fsck (exit 0, no problems); returns its summary line."""
    got = vm.run(
        ["bootc-unified", "internals", "cfs", "--repo", REPO, "fsck"], timeout=vm.timeout(300), check=False
    )
    assert got.ok, f"fsck failed after a power cut:\n{got.stdout}{got.stderr}"
    return got.stderr.strip().splitlines()[-1] if got.stderr.strip() else got.stdout.strip()


def check_whole(vm: Machine, allowed: dict[str, str]) -> dict[str, Any]:
    """After a cut: the booted deployment is one of `allowed` (id -> "old"/"new") and is what the
    kernel mounted as `/`; `status` answers with no staged deployment (the marker lived in /run);
    every BLS entry names an EROFS image and a state dir that exist, and the entries are exactly
    status's booted and rollback; no failed unit; the console clean; fsck clean; the ESP clean by
    fsck.fat -n (the boot's esp-fsck unit repairs what a cut left). Returns facts."""
    esp_said, _ = esp_check(vm)  # before anything of ours mounts it
    recovered = vm.run("journalctl -b -o cat -u bootc-unified-recover.service | grep ': recovered' || true")
    doc = status(vm)
    st = doc["status"]
    booted = entry_id(st["booted"])
    assert booted == root_source_id(vm), (booted, root_source_id(vm))
    assert booted in allowed, (booted, allowed)
    assert st["staged"] is None, json.dumps(st["staged"])[:1000]
    entries = bls_deployments(vm)
    for dep in entries:
        vm.run(["test", "-e", f"{REPO}/images/{dep}", "-a", "-d", f"/sysroot/state/deploy/{dep}/etc"])
    live = {booted, entry_id(st["rollback"])} - {None}
    assert set(entries) == live, (entries, live)
    assert failed_units(vm) == [], failed_units(vm)
    vm.check_console()
    image = entry_image(st["booted"])
    listed = json.loads(vm.run(["bootc-unified", "image", "list", "--format", "json"]).stdout)
    assert image in {name for row in listed for name in row["names"]}, listed
    facts = {"booted": booted, "outcome": allowed[booted], "fsck": fsck(vm), "entries": len(entries)}
    return facts | {"esp": esp_said, "recovered": recovered.stdout.strip()}
