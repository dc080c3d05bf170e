"""What keeps the master's memory small: asyncio without OpenSSL, sha256 without hashlib
(system/openssl.py), and the free heap given back (system/memory.py). Each runs in an interpreter of
its own: what a process imported or allocated before would hide what is measured."""

from __future__ import annotations

import hashlib
import subprocess
import sys

from supervisor.system import openssl


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_sha256_is_hashlibs() -> None:
    for data in (b"", b"/run/supervisor.sock", bytes(range(256)) * 1000):
        assert openssl.sha256(data) == hashlib.sha256(data).hexdigest()


def test_asyncio_is_imported_without_ssl_and_ssl_stays_importable() -> None:
    out = run("import sys\n"
              "from supervisor.system import openssl\n"
              "openssl.import_without_ssl('asyncio', 'structlog')\n"
              "import supervisor.system.openssl\n"
              "print(sorted(m for m in sys.modules if m in ('ssl', '_ssl', '_hashlib')), 'asyncio' in sys.modules)\n"
              "openssl.sha256(b'x')\n"
              "print(sorted(m for m in sys.modules if m in ('ssl', '_ssl', '_hashlib')))\n"
              "import ssl\n"
              "print(ssl.OPENSSL_VERSION.split()[0])")
    assert out.split("\n")[:3] == ["[] True", "[]", "OpenSSL"]


def test_a_process_that_loaded_asyncio_first_is_left_as_it_is() -> None:
    out = run("import sys, asyncio\n"
              "from supervisor.system import openssl\n"
              "openssl.import_without_ssl('structlog')\n"
              "print('ssl' in sys.modules, asyncio.base_events.ssl is not None)")
    assert out.strip() == "True True"


def test_release_gives_the_free_heap_back() -> None:
    """30 MB freed below a block still in use stays in the heap (glibc trims only its top) until release()."""
    out = run("from supervisor.system import memory\n"
              "def rss():\n"
              "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:'))\n"
              "blocks = [bytearray(100_000) for _ in range(300)]\n"  # under the mmap threshold: in the heap
              "pin = bytearray(100_000)\n"
              "del blocks\n"
              "before = rss()\n"
              "memory.release()\n"
              "print(before - rss())")
    assert int(out) > 20_000, f"{out} KiB given back"


def test_freeze_sets_what_exists_apart_and_later_cycles_are_still_collected() -> None:
    out = run("import gc\n"
              "from supervisor.system import memory\n"
              "memory.freeze()\n"
              "frozen = gc.get_freeze_count()\n"
              "class Node:\n"
              "    pass\n"
              "a, b = Node(), Node()\n"
              "a.other, b.other = b, a\n"
              "del a, b\n"
              "print(frozen > 1000, gc.collect() >= 2)")
    assert out.strip() == "True True"
