"""`preload:` as the config reads it: which commands it can fork, and the errors that name the key; whether
a spare template is current (its settings, the files its imports read)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import schema
from supervisor.errors import ConfigError
from supervisor.process import preload, preload_child
from tests.unit import fakes  # noqa: F401  (loaded: what prepare_main compiles)


@pytest.mark.parametrize(("command", "main"), [
    (("python3", "-m", "uvicorn", "--fd", "3", "app:app"), ("module", "uvicorn", ("--fd", "3", "app:app"))),
    (("/srv/venv/bin/python3.12", "serve.py"), ("script", "serve.py", ())),
    (("gunicorn", "app:app"), None),
    (("python3", "-c", "print()"), None),
    (("python3", "-m"), None),
])
def test_python_main_is_what_python_would_run_as_main(command: tuple[str, ...], main: object) -> None:
    assert schema.python_main(command) == main


@pytest.mark.parametrize(("settings", "error"), [
    ("command: [gunicorn, app:app]\n    preload: [app]",
     "x.yaml:5: programs.web.preload: needs a command that runs Python: `python -m MODULE ...` or "
     "`python SCRIPT.py ...`"),
    ("command: [python3, -m, app]\n    preload: [app, 'not a module']",
     'x.yaml:5: programs.web.preload[1]: expected a module name such as "myapp.models", got "not a module"'),
    ("command: [python3, -m, app]\n    preload: {app: 1}", "x.yaml:5: programs.web.preload: expected a list"),
])
def test_preload_errors_name_file_line_and_key(settings: str, error: str) -> None:
    text = f"programs:\n  web:\n    listen: 127.0.0.1:8000\n    {settings}\n"
    with pytest.raises(ConfigError) as caught:
        schema.parse(text, "x.yaml")
    assert str(caught.value).startswith(error), str(caught.value)


def test_preload_reads_a_list_or_one_module() -> None:
    text = "programs:\n  web:\n    listen: 127.0.0.1:8000\n    command: python3 -m app\n    preload: app.models\n"
    assert schema.parse(text, "x.yaml").programs[0].preload == ("app.models",)


# -- the spare template: is it current? --------------------------------------------------------------

WEB = schema.Program(name="web", command=("python3", "-m", "app", "--cert", "{tls.cert}"), preload=("app",),
                     tls=schema.Tls(cert="/run/x/tls.1.web/cert.pem", key="/run/x/tls.1.web/key.pem"))


@pytest.mark.parametrize(("change", "why"), [
    ({"workers": 8, "graceful_timeout": 3.0, "listen": (), "backlog": 64, "ready_timeout": 2.0}, None),
    ({"tls": schema.Tls(cert="/run/x/tls.2.web/cert.pem", key="/run/x/tls.2.web/key.pem")}, None),
    ({"command": ("python3", "-m", "app", "--cert", "{tls.cert}", "--debug")}, "command changed"),
    ({"command": ("python3.12", "-m", "app", "--cert", "{tls.cert}")}, "command changed"),
    ({"preload": ("app", "app.models")}, "preload changed"),
    ({"env": (("MODE", "fast"),)}, "env changed"),
    ({"cwd": "/srv/other"}, "cwd changed"),
    ({"user": "nobody"}, "user changed"),
    ({"group": "nogroup"}, "group changed"),
    ({"umask": 0o027}, "umask changed"),
    ({"stop_signal": signal.SIGINT}, "stop_signal changed"),
    ({"stdout": schema.OutputMode.INHERIT}, "stdout changed"),
    ({"tls": None, "command": ("python3", "-m", "app", "--cert", "{tls.cert}")}, "tls changed"),
])
def test_a_spare_fits_unless_a_setting_its_process_is_made_of_changed(change: dict[str, object],
                                                                       why: str | None) -> None:
    assert preload.unfit(WEB, dataclasses.replace(WEB, **change)) == why  # type: ignore[arg-type]


def test_a_template_of_unknown_settings_never_fits() -> None:
    assert preload.unfit(None, WEB) == "its settings are unknown"


def test_each_fork_request_carries_the_generations_own_tls_paths_and_arguments() -> None:
    gen2 = dataclasses.replace(WEB, tls=schema.Tls(cert="/run/x/tls.2.web/cert.pem", key="/run/x/tls.2.web/key.pem"))
    request = preload.fork_request(gen2, 2, 1, [], 7)
    assert request["args"] == ["--cert", "/run/x/tls.2.web/cert.pem"]
    env = request["env"]
    assert isinstance(env, dict)
    assert env["SUPERVISOR_TLS_CERT"] == "/run/x/tls.2.web/cert.pem" and env["SUPERVISOR_GENERATION"] == "2"
    assert env["SUPERVISOR_WORKER"] == "1" and request["fork"] == 7 and request["stdout"] is True


def test_the_files_a_template_read_are_current_until_one_is_rewritten_replaced_or_removed(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("app.py", "model.bin", "gone.py", "same.py")}
    for path in files.values():
        path.write_text("one")
    before = preload_child.stamp({str(p) for p in files.values()} | {str(tmp_path / "never.py"), str(tmp_path)})
    assert set(before) == {str(p) for p in files.values()}  # regular files only: no folder, nothing missing
    assert preload_child.changed(before, preload_child.stamp(set(before))) == []
    files["app.py"].write_text("two!")  # rewritten in place: another size
    replacement = tmp_path / "new.bin"
    replacement.write_text("one")
    replacement.replace(files["model.bin"])  # the same size, maybe the same mtime: another inode
    files["gone.py"].unlink()
    now = preload_child.stamp(set(before))
    assert preload_child.changed(before, now) == sorted(str(files[n]) for n in ("app.py", "gone.py", "model.bin"))


def test_the_template_stamps_what_its_imports_read(tmp_path: Path) -> None:
    """The audit hook records what is opened for reading while the preload imports run (the module, a
    data file it loads), not what they write, and nothing after."""
    data = tmp_path / "data.txt"
    data.write_text("x")
    late = tmp_path / "late.txt"
    late.write_text("y")
    (tmp_path / "reader.py").write_text(f"open({str(data)!r}).read()\nopen({str(tmp_path / 'out')!r}, 'w').close()\n")
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]); from supervisor.process import preload_child\n"
              "preload_child.record_reads(); import reader; read = preload_child.recorded()\n"
              f"open({str(late)!r}).read()\n"
              "print(json.dumps(sorted(p for p in read if p.startswith(sys.argv[1]))))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    read = set(json.loads(out.stdout))
    assert {str(data), str(tmp_path / "reader.py")} <= read and not {str(tmp_path / "out"), str(late)} & read, read


def test_the_main_module_is_compiled_once_in_the_template_only_when_that_imports_nothing() -> None:
    """`python -m MODULE`: compiled in the template when the imports loaded it (not a package, whose
    __main__ would be imported there); otherwise each worker runs runpy.run_module as before."""
    name, spec, code = preload_child.prepare_main("module", "tests.unit.fakes")
    assert name == "tests.unit.fakes" and spec.name == name and code.co_filename.endswith("fakes.py")
    assert preload_child.prepare_main("module", "json") is None  # a package
    assert preload_child.prepare_main("module", "never_imported_module") is None
    assert preload_child.prepare_main("script", "serve.py") is None
