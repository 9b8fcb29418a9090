"""Finalize's swap of the boot entries is on disk before the old set is deleted: the guest's own
vfat (the host kernel has none), a real SIGKILL at the point between the two, and the disk read
back through a second, read-only loop device (its own block cache: only what the first mount
wrote to the image shows, as after a power cut).

The power-cut scenario found the hazard: vfat's RENAME_EXCHANGE swaps the two directories' slots
only when their inodes are written back, which an fsync of loader/ does not do; a cut during
finalize left `loader/entries` naming the old set's cluster, already freed by the deletion, and
systemd-boot with no entry to boot. Without the syncfs after the exchange this test reads the old
set back.
"""

from __future__ import annotations

import pytest

from harness.vm import Machine

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.fs("ext4")]

SCRIPT = r"""
set -e
d=$(mktemp -d /var/tmp/esp-swap.XXXXXX)
cd "$d"
truncate -s 64M esp.img
mkfs.fat -F 32 esp.img >/dev/null
mkdir live disk
dev=$(losetup --find --show esp.img)
mount -t vfat "$dev" live
mkdir -p live/loader/entries live/loader/entries.staged
echo old > live/loader/entries/old.conf
echo new > live/loader/entries.staged/new.conf
sync
set +e
BOOTC_UNIFIED_CRASH_AT=entries-after-exchange python3 -c '
from pathlib import Path
from bootc_unified.deploy.finalize import swap_staged_entries
from bootc_unified.deploy.sysroot import Esp
swap_staged_entries(Esp(Path("live")))
'
echo "rc=$?"
set -e
ro=$(losetup --find --show --read-only esp.img)
mount -t vfat -o ro "$ro" disk
echo "on disk: $(ls disk/loader/entries | tr '\n' ' ')"
echo "staged on disk: $(ls disk/loader/entries.staged 2>/dev/null | tr '\n' ' ')"
umount disk
losetup -d "$ro"
umount live
losetup -d "$dev"
cd /
rm -rf "$d"
"""


def test_the_entries_swap_is_on_disk_before_the_old_set_goes(vm: Machine) -> None:
    out = vm.run(SCRIPT, timeout=vm.timeout(120)).stdout
    assert "rc=137" in out, out  # SIGKILL at entries-after-exchange: nothing deleted yet
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["on disk"].split() == ["new.conf"], out
    assert lines["staged on disk"].split() == ["old.conf"], out
