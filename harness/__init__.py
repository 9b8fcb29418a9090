"""The bootc-unified test harness: real filesystems, a local registry, VMs."""
