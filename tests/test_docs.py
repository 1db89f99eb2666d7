"""The docs cannot drift: every threshold is documented with its default, and the README's
quick start is what CI runs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from gradwatch.measure.monitor import Options
from gradwatch.thresholds import Thresholds, valid_range

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS_DOC = ROOT / "docs" / "thresholds.md"
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
CONSTRAINTS = ROOT / "constraints.txt"
TORCH_PIN = "torch==2.13.0"


def documented_defaults(text: str) -> dict[str, str]:
    """Name -> default cell, from the table rows ``| `name` | default | ...``."""
    rows: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = m.group(2)
    return rows


def quick_start_commands(text: str) -> list[str]:
    """The shell commands in the README's "Quick start" section (comments skipped)."""
    m = re.search(r"^## Quick start\s*$(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md has no '## Quick start' section"
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", m.group(1), re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_every_threshold_is_documented_with_its_default() -> None:
    rows = documented_defaults(THRESHOLDS_DOC.read_text(encoding="utf-8"))
    for field in dataclasses.fields(Thresholds):
        assert field.name in rows, f"docs/thresholds.md does not document {field.name}"
        documented = float(rows[field.name])
        assert documented == pytest.approx(field.default, rel=1e-12), (
            f"docs/thresholds.md gives {field.name} = {rows[field.name]}, the code "
            f"{field.default}")


def test_every_threshold_is_documented_with_its_valid_range() -> None:
    text = THRESHOLDS_DOC.read_text(encoding="utf-8")
    for field in dataclasses.fields(Thresholds):
        m = re.search(rf"^\| `{field.name}` \| [^|]+ \| `([^`]+)` \|", text, re.M)
        assert m, f"docs/thresholds.md gives no valid range for {field.name}"
        assert m.group(1) == str(valid_range(field.name)), (
            f"docs/thresholds.md gives {field.name} the range {m.group(1)}, the code "
            f"{valid_range(field.name)}")


def test_no_documented_threshold_is_stale() -> None:
    rows = documented_defaults(THRESHOLDS_DOC.read_text(encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(Thresholds)}
    assert set(rows) <= names, f"documented but not in Thresholds: {sorted(set(rows) - names)}"


def test_documented_default_is_the_one_the_table_parser_reads() -> None:
    # The parser the two tests above rely on must reject a wrong default, or they prove nothing.
    name = dataclasses.fields(Thresholds)[0].name
    rows = documented_defaults(f"| `{name}` | 0.123 | `(0, 1]` | float | x |\n")
    assert float(rows[name]) != getattr(Thresholds(), name)


def test_readme_documents_every_watch_option_with_its_default() -> None:
    rows = documented_defaults(README.read_text(encoding="utf-8"))
    for field in dataclasses.fields(Options):
        assert field.name in rows, f"README.md does not document the watch option {field.name}"
        assert rows[field.name] == str(field.default), (
            f"README.md gives {field.name} = {rows[field.name]}, the code {field.default}")
    assert "thresholds" in rows


def test_readme_quick_start_is_two_commands() -> None:
    commands = quick_start_commands(README.read_text(encoding="utf-8"))
    assert len(commands) == 2, f"expected a set-up command and a test command, got {commands}"
    setup, tests = commands
    assert "-c constraints.txt" in setup, "the set-up must install with the torch pin"
    assert "gradwatch demo" in setup, "the first command also runs the main job"
    assert "pytest" in tests


def test_ci_runs_the_readme_commands() -> None:
    commands = quick_start_commands(README.read_text(encoding="utf-8"))
    ci = CI.read_text(encoding="utf-8")
    for command in commands:
        for part in command.split(" && "):
            assert part in ci, f".ci/run does not run the README's {part!r}"


def test_setup_pins_torch() -> None:
    pins = [line.split("#")[0].strip() for line in
            CONSTRAINTS.read_text(encoding="utf-8").splitlines()]
    assert TORCH_PIN in pins, f"constraints.txt must pin {TORCH_PIN}"
