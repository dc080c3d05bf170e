"""The control protocol refuses anything malformed with a message that says what is wrong."""

from __future__ import annotations

import pytest

from supervisor.errors import ControlError
from supervisor.protocol import requests


class TestParseRequest:
    def test_valid_requests(self) -> None:
        """A command and its arguments come back separated."""
        assert requests.parse_request(b'{"command":"reload"}\n') == requests.Reload()
        assert requests.parse_request(requests.encode({"command": "stop", "program": "web"})) == requests.Stop("web")
        assert requests.parse_request(b'{"command":"scale","program":"web","workers":3}') == requests.Scale("web", 3)
        assert requests.parse_request(b'{"command":"restart","program":"web"}') == requests.Restart("web")
        assert requests.parse_request(b'{"command":"version"}') == requests.Version()
        assert requests.parse_request(b'{"command":"status"}') == requests.Status()
        assert requests.parse_request(b'{"command":"status","program":"api"}') == requests.Status("api")

    def test_a_relative_scale_goes_and_comes_back(self) -> None:
        """SIGTTIN's `by` crosses an upgrade's exec as a message: it must read back the same."""
        for request in (requests.Scale("web", by=-1), requests.Scale("web", 3)):
            assert requests.parse_request(requests.encode(requests.to_message(request))) == request

    @pytest.mark.parametrize(("line", "message"), [
        (b"not json\n", "malformed message"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b"\xff\xfe\n", "malformed message"),
        (b'{"command":"explode"}\n', "unknown command 'explode'"),
        (b'{}\n', "unknown command None"),
        (b'{"command":"stop"}\n', "missing argument 'program'"),
        (b'{"command":"stop","program":3}\n', "program must be a str"),
        (b'{"command":"reload","force":true}\n', "unknown argument 'force'"),
        (b'{"command":"scale","program":"web"}\n', "scale: missing argument 'workers'"),
        (b'{"command":"scale","program":"web","workers":2,"by":1}\n', "scale: workers and by exclude each other"),
        (b'{"command":"scale","program":"web","by":"1"}\n', "scale: by must be a int"),
        (b'{"command":"restart"}\n', "restart: missing argument 'program'"),
        (b'{"command":"version","program":"web"}\n', "version: unknown argument 'program'"),
    ])
    def test_malformed_requests(self, line: bytes, message: str) -> None:
        """Each kind of bad request has its own one-line error."""
        with pytest.raises(ControlError, match=message.replace("(", r"\(")):
            requests.parse_request(line)


class TestFraming:
    """framing reads and writes JSON with `_json`'s scanner and encoder (no `re` for supervisorctl):
    what json.loads and json.dumps would, byte for byte."""

    MESSAGES = [
        {"ok": True, "message": "reload done in 84 ms: 2 old listeners closed, 3 connections migrated"},
        {"ok": False, "error": "web: généré \u2028 \"quoted\" \\ back\tslash \U0001F600", "data": None},
        {"progress": "x" * 5000, "n": [1, -2, 3.5, 1e-07, 12345678901234567890, 0.1 + 0.2], "e": {}, "l": []},
        {"data": {"programs": [{"name": "web", "workers": [{"pid": 1, "rss": 12345678, "cpu": 0.25,
                                                              "state": "ready", "leaving": False}] * 64}]}},
    ]

    @pytest.mark.parametrize("message", MESSAGES)
    def test_the_same_bytes_as_json(self, message: dict[str, object]) -> None:
        import json

        from supervisor.protocol import framing

        assert framing._C is not None  # this Python has it: the fast path is the one tested
        line = framing.encode(message)
        assert line == json.dumps(message, separators=(",", ":")).encode() + b"\n"
        assert framing.decode(line) == json.loads(line) == message
        assert framing.decode(b" \t" + json.dumps(message, indent=2).encode() + b"\r\n ") == message

    @pytest.mark.parametrize(("line", "message"), [
        (b"", "expecting a value at char 0"),
        (b"   ", "expecting a value at char 3"),
        (b'{"a": 1} x', "extra data after the value"),
        (b'{"a": 1,}', "malformed message: Expecting property name"),
        (b'{"a": "\x01"}', "malformed message: Invalid control character"),
        (b"\xc3\x28", "malformed message: 'utf-8' codec"),
        (b'"text"', "expected a JSON object"),
    ])
    def test_what_json_refuses_is_a_control_error(self, line: bytes, message: str) -> None:
        from supervisor.protocol import framing

        with pytest.raises(ControlError, match=message):
            framing.decode(line)

    def test_limits_stay_python_errors_for_the_daemon_to_word(self) -> None:
        from supervisor.protocol import framing

        with pytest.raises(ValueError, match="digits") as info:
            framing.decode(b'{"n": ' + b"9" * 5000 + b"}")
        assert type(info.value) is ValueError
        with pytest.raises(RecursionError):
            framing.decode(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        with pytest.raises(TypeError, match="not JSON serializable"):
            framing.encode({"a": object()})

    def test_a_failed_encode_leaves_nothing_behind(self) -> None:
        """Each message is encoded with its own record of the containers it is in: after a failure deep
        inside one, later messages (whose containers may take the freed ones' ids) encode."""
        from supervisor.protocol import framing

        for _ in range(200):
            with pytest.raises(TypeError):
                framing.encode({"a": [{"b": [object()]}]})
            assert framing.encode({"a": [{"b": [1]}]}) == b'{"a":[{"b":[1]}]}\n'
        cycle: dict[str, object] = {}
        cycle["self"] = cycle
        with pytest.raises(ValueError, match="Circular reference"):
            framing.encode(cycle)
