"""The values table of helm/README.md, made from the chart's values.yaml the way helm-docs makes it:
a row for every key whose line is preceded by a `# -- description` comment (with any `#` lines
right after it as the description's continuation), holding its dotted path, type, default (JSON)
and description, sorted by key. `python -m moefleet.helm_docs` (`make helm-docs`) rewrites the
table between the README's markers; a test fails when the README is stale."""

import json
import re
import sys
from dataclasses import dataclass

import yaml

from moefleet.helm_values import CHART_DIR

VALUES_PATH = CHART_DIR / "values.yaml"
README_PATH = CHART_DIR.parent / "README.md"
BEGIN, END = "<!-- values-table:begin (make helm-docs) -->", "<!-- values-table:end -->"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\-/]*):(?:\s|$)")


@dataclass(frozen=True)
class ValueDoc:
    key: str  # dotted path, e.g. workerGroups.replicas.slots
    type: str  # helm-docs' names: string, int, float, bool, object, list
    default: str  # JSON
    description: str


def _helm_type(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _lookup(values: dict, path: list[str]):
    for part in path:
        values = values[part]
    return values


def key_paths(text: str) -> list[tuple[list[str], str | None, int]]:
    """(path, description or None, line number) of every mapping key in values.yaml `text`, in order
    (keys inside lists are part of their list's default and not listed)."""
    found, stack, pending = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if not match:  # a blank line, a list item, a value's continuation
            pending = None if not stripped else pending
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        found.append(([key for _, key in stack], " ".join(pending) if pending else None, number))
        pending = None
    return found


def value_docs(text: str) -> list[ValueDoc]:
    """The table's rows for values.yaml `text`, sorted by key. Raises ValueError naming the file
    and line of a key that is neither documented nor inside a documented key."""
    values = yaml.safe_load(text) or {}
    rows, documented = [], set()
    for path, description, number in key_paths(text):
        dotted = ".".join(path)
        if description is not None:
            documented.add(dotted)
            value = _lookup(values, path)
            rows.append(ValueDoc(dotted, _helm_type(value), json.dumps(value, separators=(",", ":"), sort_keys=True),
                                 description))
            continue
        value = _lookup(values, path)
        is_leaf = not isinstance(value, dict) or not value
        inherited = any(".".join(path[:i]) in documented for i in range(1, len(path)))
        if is_leaf and not inherited:
            raise ValueError(f"{VALUES_PATH}:{number}: {dotted} has no `# --` description")
    return sorted(rows, key=lambda row: row.key)


def values_table(text: str) -> str:
    """The Markdown table helm-docs writes for values.yaml `text`."""
    lines = ["| Key | Type | Default | Description |", "|-----|------|---------|-------------|"]
    for row in value_docs(text):
        cells = [row.key, row.type, f"`{row.default}`", row.description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def readme_with_table(readme: str, table: str) -> str:
    """`readme` with the text between its markers replaced by `table`."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"{README_PATH}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main() -> int:
    table = values_table(VALUES_PATH.read_text())
    README_PATH.write_text(readme_with_table(README_PATH.read_text(), table))
    print(f"wrote the values table of {README_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
