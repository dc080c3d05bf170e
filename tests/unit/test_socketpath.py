"""supervisorctl's reader of the control socket (config/socketpath.py, pyyaml's reader where it is unsure)
against pyyaml's alone (config/yamlfile.py): for every file, the same socket or the same one-line error."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from supervisor.config import socketpath, yamlfile
from supervisor.ctl.main import _control_socket
from supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def corpus() -> list[str]:
    """Config files as people write them: the shipped ones, every YAML block of the docs, what the
    test harness writes (yaml.safe_dump), and shapes at the edge of what the quick reader takes."""
    texts = [path.read_text() for path in sorted((ROOT / "config").glob("*.yaml"))]
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        texts += re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.S)
    texts.append(yaml.safe_dump({"control": {"socket": "/tmp/x/supervisor.sock"}, "migrate": "require",
                                 "programs": {"web": {"command": ["/venv/bin/python", "-m", "supervisor.demo"],
                                                      "workers": 2, "listen": ["127.0.0.1:8000"]}}},
                                sort_keys=False))
    texts += [
        "",
        "# nothing but a comment\n",
        "control:\n  socket: run/s.sock  # relative\n  mode: '0600'\nprograms: {}\n",
        "control:\n    mode: '0600'\nprograms:\n  web:\n    command: [app]\n",
        "programs:\n  web:\n    env:\n      A: b\ncontrol:\n  socket: '/run/a b.sock'\n",
        'control:\n  socket: "/run/q.sock"\n',
        "control:\n  socket: ~/s.sock\n",
        "control:\n  socket:\n",
        "control:\n  socket: ''\n",
        "control:\n  socket: 8000\n",
        "control:\n  socket: [a, b]\n",
        "control:\n",
        "control:\nprograms: {}\n",
        "control:\n  - socket: /x\n",
        "control:\n- /x\n",
        "control: /x\n",
        "control: {socket: /run/x.sock}\n",
        "control:\n  socket: /a\ncontrol:\n  socket: /b\n",
        "control:\n  socket: /a\n  socket: /b\n",
        "control:\n  mode: '0600'\ncontrol:\n  socket: /b\n",
        "control:\n  socket: /a\n   more\n",
        "control:\n  socket: /a: b\n",
        "control:\n socket: /a\n  x: 1\n",
        "control:\n  socket: /a\n x: 1\n",
        "- control\n",
        "---\ncontrol:\n  socket: /a\n",
        "control:\n\tsocket: /a\n",
        "control:\n  socket: &s /a\n",
        "control:\n  socket: !!str /a\n",
        "control:\n  socket: |\n    /a\n",
        "programs:\n  web:\n    command:\n    - app\n    - -m\n    listen:\n      - 127.0.0.1:8000\n"
        "control:\n  socket: /s\n",
        "programs:\n  web:\n    command:\n    - app\n  - x\ncontrol:\n  socket: /s\n",
        "programs:\n  web:\n    command: [app, '--x', \"y\"]  # c\n    listen: [ ]\ncontrol:\n  socket: /s # c\n",
        "programs:\n  web:\n    command: [app, x:y]\ncontrol:\n  socket: /s\n",
        "programs:\n  web:\n    command: [app, 'x:', x:]\ncontrol:\n  socket: /s\n",
        "programs:\n  web:\n    env: {A: b, C: 'd e', F: g:h}\ncontrol: {socket: /s}\n",
        "programs:\n  web:\n    env: {A: b, C}\ncontrol:\n  socket: /s\n",
        "programs:\n  web:\n    env: {A: {B: c}}\ncontrol:\n  socket: /s\n",
        "programs:\n  web:\n    command: [app,]\ncontrol:\n  socket: /s\n",
        "programs:\n  web:\n    command: a: b\ncontrol:\n  socket: /s\n",
        "programs:\n  web: {workers: two}\ncontrol:\n  socket: /s\n",
        "control:\n  socket: /" + "d" * 150 + "/" + "s" * 83 + "\n",
        "control:\n  socket: /caf\u00e9.sock\n",
    ]
    return texts


def outcome(read: Callable[[str], str], path: Path) -> str:
    try:
        return "socket " + read(str(path))
    except ConfigError as exc:
        return f"error {exc}"


def test_the_quick_reader_finds_what_pyyaml_finds(tmp_path: Path) -> None:
    """Every file of the corpus: the same socket, or the same error (file, line, key)."""
    path = tmp_path / "supervisor.yaml"
    quick = 0
    for text in corpus():
        path.write_text(text)
        assert outcome(_control_socket, path) == outcome(yamlfile.control_socket, path), text
        try:
            socketpath.scan(text)
            quick += 1
        except socketpath._Unsure:
            pass
    assert quick >= 20  # the shipped configs and the docs' own examples take the quick way


def test_a_file_it_is_unsure_of_goes_to_pyyaml(tmp_path: Path) -> None:
    """Not read here (a flow mapping) and wrong: the error is pyyaml's, with the line."""
    path = tmp_path / "s.yaml"
    path.write_text("control:\n  socket: /s\nprograms: {web: [}\n")
    with pytest.raises(ConfigError) as info:
        _control_socket(str(path))
    assert str(info.value).startswith(f"{path}:3: broken YAML")


@pytest.mark.parametrize("seed", range(2))
def test_damaged_files_are_never_read_differently(tmp_path: Path, seed: int) -> None:
    """Files of the corpus damaged at random (a character dropped, doubled or replaced by one YAML
    gives a meaning to, a line's indentation changed): whatever the quick reader accepts, pyyaml
    reads to the same socket; a broken file is never accepted."""
    rng = random.Random(seed)
    texts = [t for t in corpus() if t.strip()]
    path = tmp_path / "supervisor.yaml"
    for _ in range(1500):
        text = rng.choice(texts)
        at = rng.randrange(len(text))
        how = rng.randrange(4)
        if how == 0:
            text = text[:at] + text[at + 1:]
        elif how == 1:
            text = text[:at] + text[at] + text[at:]
        elif how == 2:
            text = text[:at] + rng.choice(":-#'\"[]{},&*!|>%@` ?\n/~") + text[at + 1:]
        else:
            lines = text.split("\n")
            i = rng.randrange(len(lines))
            lines[i] = " " * rng.randrange(5) + lines[i].lstrip(" ")
            text = "\n".join(lines)
        try:
            socketpath.scan(text)
        except socketpath._Unsure:
            continue
        path.write_text(text)
        assert outcome(_control_socket, path) == outcome(yamlfile.control_socket, path), text


def test_supervisorctl_reads_a_plain_config_without_pyyaml(tmp_path: Path) -> None:
    """`supervisorctl -c FILE status` with config/example.yaml (no daemon: exit 3) never imports pyyaml, nor shutil
    (argparse's help formatter would, for the terminal's width); a file it is unsure of does import pyyaml."""
    plain, flow = tmp_path / "example.yaml", tmp_path / "flow.yaml"
    plain.write_text((ROOT / "config" / "example.yaml").read_text())  # its socket beside it: nobody listens there
    flow.write_text("control: {socket: &s ./s.sock}\n")
    probe = ("import sys; from supervisor.ctl.main import main; code = main(['-c', sys.argv[1], 'status']); "
             "print(code, 'yaml' in sys.modules, 'shutil' in sys.modules)")
    for config, expected in ((plain, "3 False False"), (flow, "3 True False")):
        run = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True, text=True, timeout=60)
        assert run.stdout.strip() == expected, run.stderr


def test_supervisorctl_plain_status_imports_nothing_heavy(tmp_path: Path) -> None:
    """Its start is most of what `status` costs (docs/benchmarks.md, footprint): on the plain path it
    imports none of these. Run with -S, so that no .pth file (an editable install's import hook) has
    imported them before it."""
    plain = tmp_path / "example.yaml"
    plain.write_text((ROOT / "config" / "example.yaml").read_text())
    heavy = ["re", "enum", "pathlib", "argparse", "json", "types", "math", "typing", "contextlib",
             "dataclasses", "yaml", "shutil", "socket", "selectors"]
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from supervisor.ctl.main import main; "
             f"code = main(['-c', sys.argv[1], 'status']); "
             f"print(code, [m for m in {heavy!r} if m in sys.modules])")
    run = subprocess.run([sys.executable, "-S", "-c", probe, str(plain)], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "3 []", (run.stdout, run.stderr)
