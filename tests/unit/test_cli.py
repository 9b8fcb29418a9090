"""argv in, options dataclass out (bootc's verbs and flags), and usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootc_unified.cli import build_parser
from bootc_unified.cli.deploy import StatusOpts, status_opts, to_disk_opts, to_filesystem_opts
from bootc_unified.deploy.disk import InstallToDiskOpts
from bootc_unified.deploy.install import InstallToFilesystemOpts


def parse(*argv: str) -> object:
    return build_parser().parse_args(list(argv))


def test_install_to_filesystem() -> None:
    args = parse(
        *("install", "to-filesystem", "/mnt/root", "--boot-esp", "/mnt/esp"),
        *("--karg", "console=ttyS0", "--karg", "quiet", "--source-imgref", "docker://quay.io/a/b:1"),
        *("--target-imgref", "quay.io/a/b:stable", "--experimental-unified-storage"),
        *("--allow-missing-verity", "--tls-verify", "false", "--progress-fd", "3"),
    )
    assert to_filesystem_opts(args) == InstallToFilesystemOpts(  # type: ignore[arg-type]
        root=Path("/mnt/root"),
        boot_esp=Path("/mnt/esp"),
        karg=("console=ttyS0", "quiet"),
        source_imgref="docker://quay.io/a/b:1",
        target_imgref="quay.io/a/b:stable",
        target_transport="registry",
        experimental_unified_storage=True,
        allow_missing_verity=True,
        tls_verify=False,
        progress_fd=3,
    )


def test_install_to_filesystem_defaults() -> None:
    opts = to_filesystem_opts(parse("install", "to-filesystem", "/r", "--boot-esp", "/e"))  # type: ignore[arg-type]
    assert opts == InstallToFilesystemOpts(root=Path("/r"), boot_esp=Path("/e"))
    assert opts.tls_verify and not opts.experimental_unified_storage and opts.source_imgref is None


def test_install_to_disk() -> None:
    args = parse("install", "to-disk", "/dev/vdb", "--filesystem", "xfs", "--karg", "a=b")
    opts = to_disk_opts(args)  # type: ignore[arg-type]
    assert opts == InstallToDiskOpts(device=Path("/dev/vdb"), filesystem="xfs", karg=("a=b",))
    assert opts.to_filesystem(Path("/r"), Path("/e")) == InstallToFilesystemOpts(
        root=Path("/r"), boot_esp=Path("/e"), karg=("a=b",)
    )
    assert to_disk_opts(parse("install", "to-disk", "/dev/vdb")).filesystem == "ext4"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "tty", "expected"),
    [
        ([], True, StatusOpts("humanreadable")),
        ([], False, StatusOpts("yaml")),
        (["--format", "json", "--booted"], True, StatusOpts("json", booted=True)),
        (
            ["--format", "yaml", "--sysroot", "/x", "--esp", "/y"],
            False,
            StatusOpts("yaml", sysroot=Path("/x"), esp=Path("/y")),
        ),
    ],
)
def test_status(argv: list[str], tty: bool, expected: StatusOpts) -> None:
    assert status_opts(parse("status", *argv), tty=tty) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "argv",
    [
        ["install", "to-filesystem", "/r"],  # --boot-esp is required
        ["install", "to-filesystem", "/r", "--boot-esp", "/e", "--tls-verify", "maybe"],
        ["install", "somewhere"],
        ["status", "--format", "xml"],
    ],
)
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
