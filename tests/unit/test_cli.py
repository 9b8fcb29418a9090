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


# --- upgrade and switch ---------------------------------------------------------------------------------


def test_upgrade() -> None:
    from bootc_unified.cli.deploy import upgrade_opts
    from bootc_unified.deploy.update import SystemOpts
    from bootc_unified.deploy.upgrade import UpgradeOpts

    assert upgrade_opts(parse("upgrade")) == UpgradeOpts()  # type: ignore[arg-type]
    opts = upgrade_opts(parse("upgrade", "--apply", "--soft-reboot", "auto", "--progress-fd", "3", "--quiet"))  # type: ignore[arg-type]
    assert opts == UpgradeOpts(apply=True, soft_reboot="auto", progress_fd=3, quiet=True)
    assert upgrade_opts(parse("upgrade", "--check")).check  # type: ignore[arg-type]
    assert upgrade_opts(parse("upgrade", "--download-only")).download_only  # type: ignore[arg-type]
    assert upgrade_opts(parse("upgrade", "--from-downloaded", "--apply")) == UpgradeOpts(  # type: ignore[arg-type]
        from_downloaded=True, apply=True
    )
    hidden = parse(
        *("upgrade", "--sysroot", "/r", "--esp", "/e", "--mountinfo", "/m", "--staged-marker", "/s"),
        *(
            "--etc",
            "/r/etc",
            "--system-store",
            "/ss",
            "--nextroot",
            "/n",
            "--no-systemd",
            "--tls-verify",
            "false",
        ),
    )
    assert upgrade_opts(hidden).system == SystemOpts(  # type: ignore[arg-type]
        sysroot=Path("/r"),
        esp=Path("/e"),
        mountinfo=Path("/m"),
        staged_marker=Path("/s"),
        etc=Path("/r/etc"),
        system_store=Path("/ss"),
        nextroot=Path("/n"),
        systemd=False,
        tls_verify=False,
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--check", "--download-only"], "--check and --download-only cannot be combined"),
        (["--download-only", "--from-downloaded"], "--download-only and --from-downloaded"),
        (["--check", "--apply"], "--check cannot be combined with --apply"),
        (["--download-only", "--soft-reboot", "auto"], "--download-only cannot be combined"),
    ],
)
def test_upgrade_conflicts(argv: list[str], needle: str) -> None:
    from bootc_unified.cli.deploy import upgrade_opts
    from bootc_unified.errors import UserError

    with pytest.raises(UserError, match=needle):
        upgrade_opts(parse("upgrade", *argv))  # type: ignore[arg-type]


def test_switch() -> None:
    from bootc_unified.cli.deploy import switch_opts
    from bootc_unified.deploy.spec import ImageReference
    from bootc_unified.deploy.switch import SwitchOpts, target_ref

    opts = switch_opts(parse("switch", "quay.io/a/b:2"))  # type: ignore[arg-type]
    assert opts == SwitchOpts(target="quay.io/a/b:2")
    assert target_ref(opts) == ImageReference("quay.io/a/b:2", "registry")
    assert target_ref(SwitchOpts("docker://quay.io/a/b:2")) == ImageReference("quay.io/a/b:2", "registry")
    opts = switch_opts(
        parse(
            *("switch", "--transport", "oci", "--apply", "--soft-reboot", "required"),
            *("--experimental-unified-storage", "--progress-fd", "4", "/srv/layout:v2"),
        )  # type: ignore[arg-type]
    )
    assert opts == SwitchOpts(
        target="/srv/layout:v2",
        transport="oci",
        apply=True,
        soft_reboot="required",
        experimental_unified_storage=True,
        progress_fd=4,
    )
    assert target_ref(opts) == ImageReference("/srv/layout:v2", "oci")


@pytest.mark.parametrize(
    "argv",
    [
        ["switch"],  # IMAGE is required
        ["switch", "--transport", "ftp", "x/y"],
        ["upgrade", "--soft-reboot", "maybe"],
        ["switch", "--soft-reboot", "never", "quay.io/a/b"],
    ],
)
def test_update_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
