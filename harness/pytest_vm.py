"""pytest plugin for the VM tier: guest images, disks, VMs (filled in by the VM harness work)."""
