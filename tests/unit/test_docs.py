"""The documentation as a test: links that resolve, a short README, a complete configuration reference.

Links are read from README.md, CHANGELOG.md and docs/*.md outside code blocks and code spans. A
relative link must name a file or folder of the repository, and an anchor (`#...`) a heading of its
target, as GitHub makes them: the heading's text in lower case, without punctuation, spaces turned
into hyphens, a repeated one numbered (`-1`, `-2`), plus explicit `<a id="...">` anchors. A link may
leave the repository only over https (upstream documentation).

The configuration keys come from the schema itself: the fields of its frozen records, checked against
the keys the reader accepts (the list its "unknown key" error names), so a new key fails here until
docs/configuration.md has a row for it with its default.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor.config import schema
from supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = ROOT / "docs" / "configuration.md"
README_LINES = 260
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ANCHOR_TAG = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
# Traces of how the project was written, which mean nothing to a reader of the repository.
TRACES = re.compile(r"\bissue \d+|\bthe issue's\b|\.\./shared|engineers' test suites", re.IGNORECASE)


def prose(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with code spans blanked out."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, re.sub(r"`[^`]*`", "``", line)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link targets and markup dropped, then its slug rule."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(ANCHOR_TAG.findall(line))
        if match := re.match(r"#{1,6} (.+?)\s*#*$", line):
            base = slug(match[1])
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links() -> Iterator[tuple[Path, int, str]]:
    for doc in DOCS:
        for number, line in prose(doc.read_text()):
            for target in LINK.findall(line):
                yield doc, number, target


def test_the_documents_exist() -> None:
    names = {path.name for path in DOCS}
    for expected in ("README.md", "CHANGELOG.md", "configuration.md", "servers.md", "operations.md",
                     "systemd.md", "containers.md", "benchmarks.md", "troubleshooting.md", "design.md", "kernel.md"):
        assert expected in names


def test_the_link_checker_sees_links_and_headings() -> None:
    """The parsing the other tests rely on, on examples whose answer is known."""
    assert slug("§1 The sysctl `net.ipv4.tcp_migrate_req`") == "1-the-sysctl-netipv4tcp_migrate_req"
    assert slug("Metrics, /healthz, /readyz") == "metrics-healthz-readyz"
    assert slug("`command ... not found`, `x`") == "command--not-found-x"
    assert LINK.findall("see [a `b`](docs/x.md#y) and [c](https://e.org)") == ["docs/x.md#y", "https://e.org"]
    assert len(list(links())) > 100


def test_every_relative_link_resolves_inside_the_repository() -> None:
    broken = []
    for doc, number, target in links():
        where = f"{doc.relative_to(ROOT)}:{number}: {target}"
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # a scheme
            if not target.startswith("https://"):
                broken.append(f"{where}: only https links may leave the repository")
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / path_part).resolve() if path_part else doc
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{where}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where}: no heading with this anchor in {resolved.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_no_trace_of_how_the_project_was_written() -> None:
    found = [f"{doc.relative_to(ROOT)}:{number}: {line.strip()}"
             for doc in DOCS for number, line in enumerate(doc.read_text().splitlines(), 1) if TRACES.search(line)]
    assert not found, "\n".join(found)


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines; move the detail to docs/"


# -- the configuration reference --------------------------------------------------------------------

PROGRAM = "programs:\n  web:\n    command: [x]\n    listen: \"127.0.0.1:8000\"\n"
# Each record of the schema, the YAML that puts a bogus key at its level, and the fields that are no key.
RECORDS: list[tuple[type[Any], str, set[str]]] = [
    (schema.Config, "bogus: 1\n" + PROGRAM, {"path"}),
    (schema.Control, "control: {bogus: 1}\n" + PROGRAM, set()),
    (schema.Metrics, "metrics: {bogus: 1}\n" + PROGRAM, set()),
    (schema.Program, PROGRAM + "    bogus: 1\n", {"name"}),
    (schema.Tls, PROGRAM + "    tls: {cert: c, key: k, bogus: 1}\n", set()),
]


def accepted_keys(text: str) -> set[str]:
    with pytest.raises(ConfigError) as refused:
        schema.parse(text, "/tmp/keys.yaml")
    listed = re.search(r"unknown key; expected one of: (.+)$", str(refused.value))
    assert listed, str(refused.value)
    return set(listed[1].split(", "))


def rows(text: str) -> dict[str, list[str]]:
    """`key` -> the cells of its table row, for rows that start with a key in a code span."""
    found = {}
    for line in text.splitlines():
        if match := re.match(r"\|\s*`([a-z_]+)`\s*\|", line):
            found[match[1]] = [cell.strip() for cell in line.strip().strip("|").split("|")]
    return found


def section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    end = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1:])
    return text[start:start + 1 + end.start()] if end else text[start:]


def documented_default(cell: str) -> str:
    value = re.search(r"`([^`]+)`", cell)
    assert value, f"no default in code span: {cell!r}"
    return value[1].strip('"')


def same(default: Any, written: str, field: str) -> bool:
    if isinstance(default, signal.Signals):
        return written == default.name.removeprefix("SIG")
    if isinstance(default, enum.Enum):
        return bool(written == default.value)
    if field in ("mode", "umask"):
        return int(written, 8) == default
    return float(written) == float(default)


@pytest.mark.parametrize(("record", "text", "not_keys"), RECORDS, ids=[r[0].__name__ for r in RECORDS])
def test_every_config_key_is_in_the_reference_with_its_default(record: type[Any], text: str,
                                                               not_keys: set[str]) -> None:
    fields = {f.name: f for f in dataclasses.fields(record) if f.name not in not_keys}
    assert set(fields) == accepted_keys(text), "the schema's records and its reader disagree on the keys"
    reference = REFERENCE.read_text()
    heading = {schema.Config: "## Top level", schema.Control: "## `control`", schema.Metrics: "## `metrics`",
               schema.Program: "## `programs`", schema.Tls: "### `tls`"}[record]
    table = rows(section(reference, heading))
    missing = sorted(set(fields) - set(table))
    assert not missing, f"docs/configuration.md, {heading}: no row for {missing}"
    for name, field in fields.items():
        default = field.default
        if isinstance(default, int | float | enum.Enum) and not isinstance(default, bool):
            written = documented_default(table[name][1])
            assert same(default, written, name), f"{heading}, {name}: default {default!r}, documented {written!r}"


def yaml_blocks(path: Path) -> Iterator[tuple[int, str]]:
    text = path.read_text()
    for match in re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M):
        yield text[:match.start()].count("\n") + 1, match[1]


def configs() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for line, block in yaml_blocks(doc):
            if re.search(r"^programs:", block, re.M):
                found.append((f"{doc.relative_to(ROOT)}:{line}", block))
    return found


@pytest.mark.parametrize(("where", "block"), configs(), ids=[where for where, _ in configs()])
def test_every_config_example_in_the_docs_is_valid(tmp_path: Path, where: str, block: str) -> None:
    data = yaml.safe_load(block)
    if "watch" in data:  # watched files must exist when the config is read: stand-ins for the example's
        paths = data["watch"] if isinstance(data["watch"], list) else [data["watch"]]
        for i, _path in enumerate(paths):
            (tmp_path / f"watched{i}").write_text("x")
        data["watch"] = [str(tmp_path / f"watched{i}") for i in range(len(paths))]
        block = yaml.safe_dump(data)
    try:
        schema.parse(block, str(tmp_path / "supervisor.yaml"))
    except ConfigError as exc:
        pytest.fail(f"{where}: {exc}")
