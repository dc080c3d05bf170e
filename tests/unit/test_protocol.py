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
