"""The ostree backend: bootc's ostree container store, filled from the bootc-owned
containers-storage without writing file data again (reflink / hardlink objects, one commit of
hardlinks), and offline deployment into an ostree sysroot."""
