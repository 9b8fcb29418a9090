"""What goes into the target's boot path: the kernel command line (`cmdline.py`, the one module
`deploy/` imports from here), the initramfs hook (`initramfs/`) and systemd units (`units/`).

Layer: imports nothing of bootc_unified; imported by deploy.
"""

from bootc_unified.boot.cmdline import (
    ComposefsArg,
    format_composefs,
    join_cmdline,
    parse_composefs,
    split_cmdline,
)

__all__ = ["ComposefsArg", "format_composefs", "join_cmdline", "parse_composefs", "split_cmdline"]
