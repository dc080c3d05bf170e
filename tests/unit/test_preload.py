"""`preload:` as the config reads it: which commands it can fork, and the errors that name the key."""

from __future__ import annotations

import pytest

from supervisor.config import schema
from supervisor.errors import ConfigError


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
