"""Where supervisord and supervisorctl find the config: -c, then $SUPERVISOR_CONFIG, then the default path."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import locate as locate_module
from supervisor.config.locate import locate
from supervisor.errors import ConfigError


class TestLocate:
    def test_the_command_line_comes_first(self, tmp_path: Path) -> None:
        """-c is taken as it is, even where it does not exist (reading it says so, with the path)."""
        assert locate("given.yaml", {"SUPERVISOR_CONFIG": str(tmp_path)}) == "given.yaml"

    def test_then_the_environment(self, tmp_path: Path) -> None:
        """$SUPERVISOR_CONFIG names the file; one that does not exist is one line naming it and the variable."""
        found = tmp_path / "s.yaml"
        found.write_text("")
        assert locate(None, {"SUPERVISOR_CONFIG": str(found)}) == str(found)
        with pytest.raises(ConfigError) as refused:
            locate(None, {"SUPERVISOR_CONFIG": str(tmp_path / "gone.yaml")})
        assert str(refused.value) == f"{tmp_path}/gone.yaml: no such file (named by $SUPERVISOR_CONFIG)"

    def test_then_the_default_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With neither, the default path; where it does not exist, the line says where it looked and why."""
        default = tmp_path / "supervisor.yaml"
        monkeypatch.setattr(locate_module, "DEFAULT_PATH", str(default))
        with pytest.raises(ConfigError) as refused:
            locate(None, {"SUPERVISOR_CONFIG": ""})
        assert str(refused.value) == (f"{default}: no such file (the default path: neither -c nor "
                                      "$SUPERVISOR_CONFIG was given)")
        default.write_text("")
        assert locate(None, {}) == str(default)
