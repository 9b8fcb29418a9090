#!/usr/bin/env bash
# Install everything bootc-unified and its test tiers need on Debian 12, idempotently.
# Usage: ci/setup.sh            (as root; safe to run again)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${BOOTC_UNIFIED_VENV:-$here/.venv}

packages=(
    podman buildah skopeo runc uidmap docker-registry busybox-static openssh-client
    btrfs-progs xfsprogs e2fsprogs dosfstools fdisk mtools util-linux
    fsverity erofs-utils ostree
    qemu-system-x86 qemu-utils ovmf systemd-boot-efi mmdebstrap
    libvirt-daemon-system libvirt-clients libxml2-utils libvirt-dev pkg-config
    python3 python3-venv python3-dev gcc
    curl ca-certificates rsync zstd attr python3-yaml
    git chromium
)

die() { echo "setup: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (loop devices, mounts and podman's store need it)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12"

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Services are started by the project's scripts, not by package postinst (PID 1 may not be systemd).
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

# Debian's python3 (3.11 on bookworm): the venv holds the package and its test dependencies
# (tmt among them: `.venv/bin/tmt run` works after this script).
stamp=$venv/.setup-stamp
want=$(cat "$here/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: creating virtual environment $venv"
    /usr/bin/python3 -m venv "$venv"
    log=$(mktemp)
    if ! { "$venv/bin/pip" install -q --upgrade pip && "$venv/bin/pip" install -q -e "$here[test]"; } >"$log" 2>&1; then
        cat "$log" >&2
        die "pip install failed (output above)"
    fi
    rm -f "$log"
    echo "$want" > "$stamp"
fi
