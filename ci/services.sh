#!/usr/bin/env bash
# Start the services the tests need when they are not running (PID 1 may not be systemd).
# The local registry is started per test session by the harness itself; libvirt is started here
# (and by the harness, harness/vm/libvirtd.py, when it finds it stopped).
set -euo pipefail

# libvirt: QEMU runs as root. With Debian's default (libvirt-qemu) and a /dev/kvm only root can
# open, libvirt's capability cache flips between "KVM" and "no KVM" and re-probes QEMU on every
# domain start (~60 s each); as root the probe and the check agree.
conf=/etc/libvirt/qemu.conf
changed=0
if [ -f "$conf" ]; then
    for key in user group; do
        if ! grep -q "^$key = \"root\"" "$conf"; then
            sed -i "/^$key = /d" "$conf"
            echo "$key = \"root\"" >> "$conf"
            changed=1
        fi
    done
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    if command -v libvirtd >/dev/null; then
        if [ $changed = 1 ]; then systemctl restart libvirtd; else systemctl start libvirtd; fi
    fi
elif command -v libvirtd >/dev/null; then
    running /run/virtlogd.pid || virtlogd -d
    if [ $changed = 1 ] && running /run/libvirtd.pid; then
        kill "$(cat /run/libvirtd.pid)"
        for _ in $(seq 50); do running /run/libvirtd.pid || break; sleep 0.2; done
    fi
    running /run/libvirtd.pid || libvirtd -d
fi
exit 0
