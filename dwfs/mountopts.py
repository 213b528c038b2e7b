"""Mount options (`-o a,b=c`), as given on the command line, in fstab or a systemd unit."""

from __future__ import annotations

from dataclasses import dataclass, field

# Passed on to the kernel's FUSE mount.
FUSE_OPTIONS = {"ro", "rw", "nodev", "dev", "nosuid", "suid", "noexec", "exec", "noatime",
                "relatime", "strictatime", "nodiratime", "sync", "async", "dirsync",
                "allow_other", "default_permissions"}
# Meant for mount(8), fstab or systemd, not for the filesystem: accepted and ignored.
IGNORED = {"defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail",
           "_netdev", "comment", "loud", "silent", "x-gvfs-show", "x-gvfs-hide"}
IGNORED_PREFIXES = ("x-systemd.", "x-gvfs-", "comment=", "x-")


class MountOptionError(ValueError):
    """An option dwfs does not know."""


@dataclass
class MountOptions:
    """Options split into what goes to FUSE and what dwfs itself uses."""

    fuse: set[str] = field(default_factory=set)
    debug: bool = False
    foreground: bool = False


def parse_options(text: str) -> MountOptions:
    """Parse a comma-separated option list; unknown options raise MountOptionError."""
    opts = MountOptions()
    for raw in (text or "").split(","):
        opt = raw.strip()
        if not opt or opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
            continue
        if opt in FUSE_OPTIONS:
            if opt not in ("rw", "relatime", "async"):
                opts.fuse.add(opt)
        elif opt == "debug":
            opts.debug = True
        elif opt == "foreground":
            opts.foreground = True
        else:
            raise MountOptionError(f"unknown mount option {opt!r}")
    return opts
