"""The configuration reference page of the docs, generated from the config model as `--help` is, so the two
cannot drift: `python -m tapeline.reference docs/configuration.md` writes it, `--check` says whether it is stale."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tapeline.config import PRESETS, PipelineConfig, Section, field_marks

INTRO = """# Configuration

<!-- Generated from tapeline/config.py by `python -m tapeline.reference docs/configuration.md`; do not edit. -->

One frozen pydantic `PipelineConfig` (`tapeline/config.py`) with a section per stage: defaults in code, then an
optional YAML file (`--config`), then `--set section.key=value` overrides (values are YAML scalars:
`--set model.conv_filters=[32,64]`). The same model is the Prefect flow's one parameter, `config`, so the Prefect UI
shows it as a form and `--params '{"config": {"train": {"max_epochs": 1}}}'` works with every key optional. Unknown
keys and invalid values fail before any work, naming the key.

Marks: *runtime* is a knob of how a stage runs, never of what it produces: every fingerprint leaves it out, so
changing it reuses every cached output. *used by STAGE* is a key kept in its section for compatibility but read by
another stage, whose fingerprint covers it (`data.batch_size` shapes training, not the TFRecords).
"""


def shown(value: Any) -> str:
    """A default as it would be written in YAML (`none`, `true`, `[32, 64]`, `'auto'` as `auto`)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def mark(field: Any) -> str:
    """The field's runtime / used-by mark, as the page writes it."""
    marks = field_marks(field)
    if marks.get("affects_output") is False:
        return "runtime"
    return f"used by {marks['used_by']}" if "used_by" in marks else ""


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _section_table(name: str, section: type[Section]) -> list[str]:
    """One section's keys as a Markdown table."""
    rows = [f"## `{name}`", "", (section.__doc__ or "").strip().splitlines()[0], "",
            "| key | default | meaning | mark |", "|---|---|---|---|"]
    for key, field in section.model_fields.items():
        rows.append(f"| `{name}.{key}` | `{cell(shown(field.get_default(call_default_factory=True)))}` | "
                    f"{cell(field.description or '')} | {mark(field)} |")
    return [*rows, ""]


def _presets_table() -> list[str]:
    """Every preset's keys."""
    rows = ["## Presets", "", "`--preset NAME` (or `preset: NAME` in the file, or `--set preset=NAME`) fills in a "
            "named bundle of keys underneath the file's own keys and `--set`, so any explicit key wins. With "
            "`model.builder` set, a preset's `model.*` keys are left out (they describe the built-in CNN).", "",
            "| preset | keys |", "|---|---|"]
    for name, tree in PRESETS.items():
        keys = ", ".join(f"`{section}.{key}={shown(value)}`" for section, values in tree.items()
                         for key, value in values.items())
        rows.append(f"| `{name}` | {cell(keys)} |")
    return [*rows, ""]


def configuration_page() -> str:
    """The whole configuration page."""
    lines = [INTRO, "## Top level", "", "| key | default | meaning | mark |", "|---|---|---|---|"]
    sections = []
    for name, field in PipelineConfig.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            sections.append((name, annotation))
        else:
            lines.append(f"| `{name}` | `{shown(field.default)}` | {cell(field.description or '')} | {mark(field)} |")
    lines.append("")
    for name, section in sections:
        lines.extend(_section_table(name, section))
    lines.extend(_presets_table())
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    """Write the page to the path given, or with `--check` exit 1 when the file there differs."""
    parser = argparse.ArgumentParser(prog="python -m tapeline.reference",
                                     description="Write the configuration reference page (docs/configuration.md).")
    parser.add_argument("--check", action="store_true", help="exit 1 when the page there is stale; write nothing")
    parser.add_argument("page", type=Path, help="the page to write or check, e.g. docs/configuration.md")
    args = parser.parse_args(argv)
    page = configuration_page()
    if args.check:
        if not args.page.is_file() or args.page.read_text() != page:
            print(f"{args.page} is stale: run `python -m tapeline.reference {args.page}`", file=sys.stderr)
            return 1
        return 0
    args.page.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
