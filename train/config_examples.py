"""The commented example files configs/<subcommand>.toml, generated from the config dataclasses' help texts (a
maintenance tool: `example_toml("kd", {...})` when a key is added; tests/test_config.py checks that every example
file comments every key)."""
from __future__ import annotations

import dataclasses

from train.config import SECTION_TYPES, SECTIONS, TeacherConfig, _toml_value


def example_toml(subcommand: str, values: dict, header: str = "") -> str:
    """A TOML file for `subcommand` holding every key it reads, each with its help text as a comment: `values`
    ({"section.key": value}, teachers as "teachers.<name>.path") set keys; the rest show their defaults, and
    optional keys without a value are written commented out."""
    import textwrap
    lines = [f"# {x}" if x else "#" for x in header.strip().splitlines()] + [""] if header else []
    for s in SECTIONS[subcommand]:
        cls = SECTION_TYPES[s]
        lines.append(f"[{s}]")
        for f in dataclasses.fields(cls):
            if f.name == "named":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = values.get(f"{s}.{f.name}", default)
            for c in textwrap.wrap(f.metadata["help"], 108):
                lines.append(f"# {c}")
            lines.append(f"# {f.name} = {_toml_value(f.metadata['example'])}" if value is None
                         else f"{f.name} = {_toml_value(value)}")
        if s == "teachers":
            names = sorted({k.split(".")[1] for k in values if k.startswith("teachers.") and k.count(".") == 2})
            for name in names:
                lines += ["", f"[teachers.{name}]"]
                for f in dataclasses.fields(TeacherConfig):
                    value = values.get(f"teachers.{name}.{f.name}", f.default)
                    for c in textwrap.wrap(f.metadata["help"], 108):
                        lines.append(f"# {c}")
                    lines.append(f"# {f.name} = \"...\"" if value == "" else f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
