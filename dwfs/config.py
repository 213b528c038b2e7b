"""The warehouse configuration file, dwfs.toml: the array's identity and its member list."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from dwfs.notify import NotifyConfig
from dwfs.sizes import parse_size

CONFIG_NAME = "dwfs.toml"


class ConfigError(ValueError):
    """A missing, unreadable or malformed dwfs.toml."""


@dataclass
class WarehouseConfig:
    """What dwfs.toml says: array UUID, level, chunk size, backend and member paths."""

    directory: str
    array_uuid: str
    level: str
    chunk_size: int
    backend: str
    members: list[str] = field(default_factory=list)
    created: str = ""
    ghost_cache_limit: int | None = None  # bytes of ghost content kept; None: no limit
    notify: NotifyConfig = field(default_factory=NotifyConfig)  # [notify]: who is told what
    # [[spares]]: member files made ahead, taken by the mount daemon when a member fails
    spares: list[str] = field(default_factory=list)
    # what each member's disk is (model and serial; "" for a file), by slot: a disk that is
    # gone is still told apart from the others
    disks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.disks = (list(self.disks) + [""] * len(self.members))[: len(self.members)]

    @property
    def path(self) -> str:
        return os.path.join(self.directory, CONFIG_NAME)

    def member_path(self, slot: int) -> str:
        """Absolute path of a member (relative paths are relative to the warehouse)."""
        return self.resolve(self.members[slot])

    def resolve(self, p: str) -> str:
        """A path of dwfs.toml made absolute (relative ones are relative to the warehouse)."""
        return p if os.path.isabs(p) else os.path.join(self.directory, p)

    def member_paths(self) -> list[str]:
        return [self.member_path(i) for i in range(len(self.members))]

    def to_toml(self) -> str:
        lines = [
            "# dwfs warehouse: the redundant array and where its members are.",
            "[array]",
            f"uuid = {_q(self.array_uuid)}",
            f"level = {_q(self.level)}",
            f"chunk_size = {self.chunk_size}",
            f"backend = {_q(self.backend)}",
            f"created = {_q(self.created)}",
            "",
        ]
        if self.ghost_cache_limit is not None:
            lines += ["[filesystem]", f"ghost_cache_limit = {self.ghost_cache_limit}", ""]
        lines += self.notify.toml_lines(_q)
        for p, disk in zip(self.members, self.disks, strict=True):
            lines += ["[[members]]", f"path = {_q(p)}"] + ([f"disk = {_q(disk)}"] if disk
                                                            else []) + [""]
        for p in self.spares:
            lines += ["[[spares]]", f"path = {_q(p)}", ""]
        return "\n".join(lines)

    def save(self) -> None:
        """Write dwfs.toml atomically (temporary file, fsync, rename)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_toml())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def load_config(directory: str) -> WarehouseConfig:
    """Read and validate a warehouse's dwfs.toml."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{directory} is not a dwfs warehouse: {CONFIG_NAME} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        array = data["array"]
        cfg = WarehouseConfig(
            directory=directory,
            array_uuid=_str(array, "uuid"),
            level=_str(array, "level"),
            chunk_size=_int(array, "chunk_size"),
            backend=_str(array, "backend"),
            created=str(array.get("created", "")),
            members=[_str(m, "path") for m in data["members"]],
            disks=[str(m.get("disk", "")) for m in data["members"]],
            ghost_cache_limit=_ghost_cache_limit(data),
            notify=NotifyConfig.from_table(data["notify"]) if "notify" in data
            else NotifyConfig(),
            spares=[_str(m, "path") for m in data.get("spares", [])],
        )
    except KeyError as exc:
        raise ConfigError(f"{path}: missing setting {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not cfg.members:
        raise ConfigError(f"{path}: no [[members]] listed")
    members = {os.path.realpath(p) for p in cfg.member_paths()}
    for spare in cfg.spares:
        if os.path.realpath(cfg.resolve(spare)) in members:
            raise ConfigError(f"{path}: spare {spare} is also listed as a member")
    return cfg


def _ghost_cache_limit(data: dict) -> int | None:
    """`ghost_cache_limit` from [filesystem] (or the top level): bytes, or a size like "2G"."""
    section = data.get("filesystem", {})
    if not isinstance(section, dict):
        raise ValueError("[filesystem] must be a table")
    value = section.get("ghost_cache_limit", data.get("ghost_cache_limit"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"ghost_cache_limit must be a size such as \"10G\", got {value!r}")
    limit = parse_size(value) if isinstance(value, str) else value
    if limit < 0:
        raise ValueError(f"ghost_cache_limit must not be negative, got {value!r}")
    return limit


def _str(table: dict, key: str) -> str:
    value = table[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _int(table: dict, key: str) -> int:
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value
