"""`preload:` with real processes: each generation's workers forked from a template that imported the code once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme

from tests.harness import DEMO, PYTHON, Supervisor, program, request, request_cert, running, supervisor, wait_for
from tests.load import Clients
from tests.scenarios.test_tls import client, tls_program, write_cert

pytestmark = pytest.mark.usefixtures("netns")
ROOT = Path(__file__).resolve().parents[2]  # uvicorn imports `tests.apps.asgi` from here
APPS = ROOT / "tests" / "apps"
PRELOADED: dict[str, tuple[list[str], dict[str, Any]]] = {
    "demo": (DEMO, {"preload": ["supervisor.demo"]}),
    "uvicorn": ([PYTHON, "-m", "uvicorn", "--fd", "3", "--no-access-log", "tests.apps.asgi:app"],
                {"preload": ["uvicorn.main", "tests.apps.asgi"], "ready": "accepting", "settle": 0.2,
                 "stop_delay": 0.5, "cwd": str(ROOT)}),
}


def spare_pid(sup: Supervisor, used: Collection[int] = ()) -> int:
    """The pid of the program's spare template: the last one started as a spare, once there is one whose
    pid is not in `used` (a reload answers before it starts the next spare, and the log may lag)."""
    spares = wait_for("a spare template", lambda: [
        e for e in sup.events("template_started") if e["spare"] and e["pid"] not in used])
    return int(spares[-1]["pid"])


def ready_spare(sup: Supervisor, used: Collection[int] = ()) -> int:
    """The spare's pid once it has imported its modules (what it stamped is what it read by then)."""
    spare = spare_pid(sup, used)
    wait_for("the spare ready", lambda: any(e["pid"] == spare for e in sup.events("template_ready")))
    return spare


def serving_template(sup: Supervisor) -> psutil.Process:
    """The serving generation's template: the live template that is not the spare."""
    spare = spare_pid(sup)
    [template] = wait_for("the serving template", lambda: [t for t in templates(sup) if t.pid != spare])
    return template


def templates(sup: Supervisor) -> list[psutil.Process]:
    """The master's live children that are preload templates (its workers forked from one have its command
    line). A child may end between the listing and the reading: a zombie's command line cannot be read
    (psutil.ZombieProcess), a reaped one is gone (NoSuchProcess); either way it is no live template."""
    assert sup.proc is not None
    workers = {w["pid"] for w in sup.workers()}
    found = []
    for p in psutil.Process(sup.proc.pid).children():
        if p.pid in workers:
            continue
        try:
            if "preload_child.py" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
    return found


@pytest.mark.parametrize(("name", "accept_queue"), [("demo", "per-worker"), ("uvicorn", "per-worker"),
                                                    ("uvicorn", "shared")])
def test_reloads_under_load_fail_no_connection(tmp_path: Path, name: str, accept_queue: str) -> None:
    """Reloads of forked workers while 64 connections are in flight: 0 failed; each generation has its
    own template (the spare started once the last one served), its workers are the master's children,
    the retired generations' templates exit; the serving template and the next spare are left (with one
    shared queue the template hands the generation's one listener to each fork)."""
    command, settings = PRELOADED[name]
    settings = {**settings, "accept_queue": accept_queue}
    with supervisor(tmp_path, {"web": program(command, graceful_timeout=5, **settings)}) as sup, \
            Clients("127.0.0.1:8000", seconds=60) as load:
        assert sup.proc is not None
        reloads = 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            time.sleep(0.2)  # pacing: the load runs between reloads
            sup.reload()
            reloads += 1
        for w in sup.workers():
            try:
                parent = psutil.Process(w["pid"]).ppid()
            except psutil.NoSuchProcess:  # a retiring worker that exited since the status was read
                continue
            assert parent == sup.proc.pid  # reparented: the master reaps it
        wait_for("two templates left: the serving one and the spare", lambda: len(templates(sup)) == 2)
        assert sup.generation() == reloads + 1
        assert len(sup.events("template_spare_used")) == reloads  # the code never changed
        time.sleep(0.3)  # the load runs on against the last generation (Clients has no live count to wait on)
        tally = load.finish()
    assert not tally.failures, tally.failed()
    assert reloads >= 3 and tally.ok > 20 * reloads


def test_a_reload_loads_the_changed_module_and_restarts_fork_the_same_code(tmp_path: Path) -> None:
    """`python script.py` with a preloaded module: a reload serves its new text (the spare that imported
    the old text is stale: a fresh template); a crash restart is forked from the generation's template,
    so it still has the code its siblings have."""
    (tmp_path / "greeting.py").write_text('WORD = "one"\n')
    (tmp_path / "app.py").write_text(
        "import sys\nimport greeting\nfrom supervisor import demo\n"
        "print(f'greeting={greeting.WORD} argv={sys.argv[1:]}', file=sys.stderr, flush=True)\n"
        "sys.exit(demo.main([]))\n")
    settings = program([PYTHON, str(tmp_path / "app.py"), "--flag"], preload=["greeting"])
    with supervisor(tmp_path, {"web": settings}) as sup:
        spare = ready_spare(sup)
        (tmp_path / "greeting.py").write_text('WORD = "two"\n')
        victim = sup.workers()[0]["pid"]
        psutil.Process(victim).kill()
        wait_for("the restarted worker", lambda: sup.replaced(victim, 2))
        wait_for("three workers of generation 1", lambda: [
            e["line"] for e in sup.events("worker_stderr") if "greeting=" in e["line"]] == [
            "greeting=one argv=['--flag']"] * 3)
        sup.reload()
        wait_for("two workers of generation 2 with the new code", lambda: [
            e["line"] for e in sup.events("worker_stderr") if "greeting=" in e["line"] and e["gen"] == 2] == [
            "greeting=two argv=['--flag']"] * 2)
        assert request()[1]["generation"] == 2
        [stale] = sup.events("template_spare_stale")
        assert stale["pid"] == spare and stale["changed"] == [str(tmp_path / "greeting.py")], stale
        assert not sup.events("template_spare_used")


def test_a_template_whose_import_fails_is_rolled_back_with_its_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import json\nraise RuntimeError('the model file is missing')\n")
    with supervisor(tmp_path, {"web": program(preload=["supervisor.demo"])}) as sup:
        sup.write({"web": program(preload=["supervisor.demo", "broken"], cwd=str(tmp_path))})
        result = sup.ctl("reload")
        assert result.returncode == 1, result.stdout
        assert "web: generation 2 worker 0 was not forked before it was ready" in result.stderr
        assert "its preload template (pid" in result.stderr and "exit status 1" in result.stderr
        assert "Traceback (most recent call last):" in result.stderr
        assert "RuntimeError: the model file is missing" in result.stderr
        assert "rolled back, still serving: web#1" in result.stderr
        assert request()[1]["generation"] == 1 and sup.serving()


def test_user_umask_env_cwd_and_parent_death_signal_hold_in_forked_workers(tmp_path: Path) -> None:
    shared = Path(tempfile.mkdtemp(prefix="preload-"))  # pytest's folders are root's alone: nobody's cwd is here
    shared.chmod(0o755)
    out = shared / "out"
    out.mkdir()
    out.chmod(0o777)  # nobody writes its facts there
    (shared / "app").mkdir()
    recorder = [PYTHON, str(APPS / "recorder.py"), str(out)]
    settings = program(recorder, workers=2, preload=["json"], user="nobody", umask="027", cwd=str(shared / "app"),
                       env={"APP_ENV": "production"}, listen=["127.0.0.1:443"])
    with supervisor(tmp_path, {"web": settings}) as sup:
        assert sup.proc is not None
        workers = [w["pid"] for w in sup.workers()]
        facts = [json.loads((out / f"{pid}.json").read_text()) for pid in workers]
        for pid, fact in zip(workers, facts, strict=True):
            proc = psutil.Process(pid)
            assert proc.username() == "nobody" and proc.ppid() == sup.proc.pid
            assert "Umask:\t0027" in Path(f"/proc/{pid}/status").read_text()
            assert fact["cwd"] == str(shared / "app") and fact["environ"]["APP_ENV"] == "production"
            assert fact["environ"]["USER"] == "nobody" and fact["environ"]["LISTEN_PID"] == str(pid)
            assert fact["environ"]["LISTEN_FDS"] == "1" and fact["environ"]["LISTEN_FDNAMES"] == "web.0"
            assert os.getsid(pid) == pid  # its own session, as a spawned worker
        assert sorted(fact["environ"]["SUPERVISOR_WORKER"] for fact in facts) == ["0", "1"]
        spare = spare_pid(sup)
        both = wait_for("the serving template and the spare", lambda: len(templates(sup)) == 2 and templates(sup))
        assert all(template.username() == "nobody" for template in both) and spare in {t.pid for t in both}
        sup.proc.kill()
        sup.proc.wait()
        wait_for("forked workers and the templates to die with the master",
                 lambda: not any(running(pid) for pid in [*workers, *(t.pid for t in both)]))
    shutil.rmtree(shared)




def test_a_dead_template_is_started_again_for_the_next_restart_and_upgrade_is_refused(tmp_path: Path) -> None:
    """The template of the serving generation is killed: the workers serve on, a crash restart starts a
    new template for the generation. `upgrade` cannot hand a template over: refused, nothing changes."""
    with supervisor(tmp_path, {"web": program(preload=["supervisor.demo"])}) as sup:
        template = serving_template(sup)
        template.kill()
        wait_for("the template's exit in the log", lambda: sup.events("template_exited"))
        victim = sup.workers()[0]["pid"]
        psutil.Process(victim).kill()
        wait_for("the restarted worker", lambda: sup.replaced(victim, 2))
        wait_for("a new template for generation 1", lambda: [e["gen"] for e in sup.events("template_started")]
                 == [1, 0, 1])
        assert request()[1]["generation"] == 1
        result = sup.ctl("upgrade")
        assert result.returncode == 1
        assert "upgrade refused, nothing changed: web preload from a template process" in result.stderr
        assert not sup.events("handler_failed")


def test_a_template_stuck_in_its_imports_is_killed_when_its_generation_times_out(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(120)\n")
    with supervisor(tmp_path, {"web": program(preload=["supervisor.demo"])}) as sup:
        sup.write({"web": program(preload=["slow"], cwd=str(tmp_path), ready_timeout=1.5)})
        result = sup.ctl("reload")
        assert result.returncode == 1 and "web: generation 2 not ready within 1.5 s" in result.stderr
        wait_for("the stuck template killed", lambda: [e["status"] for e in sup.events("template_exited")
                                                       if e["gen"] == 2] == ["killed by SIGKILL"])
        assert [e["why"] for e in sup.events("template_spare_unfit")] == ["preload changed"]
        wait_for("the serving template and a new spare", lambda: len(templates(sup)) == 2)
        assert request()[1]["generation"] == 1
        assert not sup.events("handler_failed")


def test_reloads_leak_no_fd_and_no_template(tmp_path: Path) -> None:
    """Each reload adopts the spare, starts the next one and ends the last generation's template: the
    master's fds come back to the same count."""
    with supervisor(tmp_path, {"web": program(preload=["supervisor.demo"], stop_delay=0.1)}) as sup:
        assert sup.proc is not None
        master = psutil.Process(sup.proc.pid)

        def settled(retired: int) -> int:
            """The master's fds once the serving generation alone is left and `retired` templates have been
            handled (it closes a template's fds before it logs template_exited)."""
            wait_for("only the serving generation left", lambda: len(sup.workers()) == 2 and len(templates(sup)) == 2
                     and len(sup.events("template_exited")) == retired)
            return master.num_fds()

        sup.reload()
        before = settled(1)
        for _ in range(8):
            sup.reload()
        assert settled(9) == before
        assert len(sup.events("template_exited")) == 9 and not sup.events("handler_failed")


def test_a_fork_the_template_cannot_make_fails_that_worker_only(tmp_path: Path) -> None:
    """The template's user may run no more processes (RLIMIT_NPROC): a restart's fork fails with EAGAIN,
    is reported for that worker (a crash, retried with backoff), and the template and the others serve on."""
    with supervisor(tmp_path, {"web": program(preload=["supervisor.demo"], user="nobody", cwd="/",
                                              listen=["127.0.0.1:443"])}) as sup:
        template = serving_template(sup)
        # nobody runs 4 processes already; as nobody, since root may lack CAP_SYS_RESOURCE in a container
        subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "prlimit",
                        f"--pid={template.pid}", "--nproc=1:1"], check=True)
        victim, survivor = (w["pid"] for w in sup.workers())
        psutil.Process(victim).kill()
        wait_for("the fork's failure", lambda: sup.events("worker_not_forked"))
        assert "its preload template could not fork it: fork: [Errno 11]" in sup.events("worker_not_forked")[0]["why"]
        assert running(template.pid) and running(survivor) and not sup.events("handler_failed")


def test_more_fork_requests_than_the_socket_holds_wait_for_the_template(tmp_path: Path) -> None:
    """A template still importing while 320 workers are asked for: its socket holds about 280 requests
    (the sender's buffer), the rest are sent as it answers; every worker starts."""
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(1)\n")
    (tmp_path / "idle.py").write_text(  # a worker that costs nothing: READY=1, then waits for its stop signal
        "import os, socket, time\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n"
        "time.sleep(300)\n")
    settings = program([PYTHON, "-m", "idle"], workers=320, preload=["slow"], cwd=str(tmp_path), ready_timeout=60,
                       stop_delay=0, graceful_timeout=1)
    with supervisor(tmp_path, {"web": settings}) as sup:
        assert len(sup.workers()) == 320
        assert not sup.events("handler_failed") and not sup.events("template_unreachable")


GREETING_APP = ("import sys\nimport greeting\nfrom supervisor import demo\n"
                "print(f'greeting={greeting.WORD}', file=sys.stderr, flush=True)\nsys.exit(demo.main([]))\n")


def test_the_spare_serves_unchanged_code_is_replaced_when_it_dies_and_never_serves_changed_code(
        tmp_path: Path) -> None:
    """Under 64 connections in flight: a reload after a config change forks from the spare (its pid in
    `template_spare_used`); a spare killed while it waits is replaced, and the next reload forks from the
    replacement; after the application's code changed the spare is stale, a fresh template imports the
    new code and serves it. 0 failed connections throughout."""
    (tmp_path / "greeting.py").write_text('WORD = "one"\n')
    (tmp_path / "app.py").write_text(GREETING_APP)
    settings = program([PYTHON, str(tmp_path / "app.py")], preload=["greeting", "supervisor.demo"], stop_delay=0.2)
    with supervisor(tmp_path, {"web": settings}) as sup, Clients("127.0.0.1:8000", seconds=60) as load:
        first = spare_pid(sup)
        sup.write({"web": {**settings, "graceful_timeout": 7}})  # a setting a template is not made of
        sup.reload()
        assert [(e["gen"], e["pid"]) for e in sup.events("template_spare_used")] == [(2, first)]

        second = ready_spare(sup, used={first})
        psutil.Process(second).kill()
        third = spare_pid(sup, used={first, second})  # the dead spare replaced
        sup.reload()
        assert [e["pid"] for e in sup.events("template_spare_used")] == [first, third]

        ready_spare(sup, used={first, second, third})
        (tmp_path / "greeting.py").write_text('WORD = "brand new"\n')
        sup.reload()
        [stale] = sup.events("template_spare_stale")
        assert stale["gen"] == 4 and stale["changed"] == [str(tmp_path / "greeting.py")], stale
        wait_for("generation 4 with the new code", lambda: [
            e["line"] for e in sup.events("worker_stderr") if e["gen"] == 4 and "greeting=" in e["line"]] == [
            "greeting=brand new"] * 2)
        assert request()[1]["generation"] == 4
        time.sleep(0.3)  # the load runs on against the last generation
        tally = load.finish()
    assert not tally.failures, tally.describe()
    assert tally.ok > 200, tally.describe()


def test_a_certificate_rotation_forks_from_the_spare_and_serves_the_new_certificate(tmp_path: Path) -> None:
    """The case the spare is for: only the certificate changed. The new generation's workers are forked
    from the spare and present the new certificate (the paths of the generation's copies travel with
    each fork request, not in the spare's own environment)."""
    ca = trustme.CA()
    write_cert(ca, tmp_path)
    with supervisor(tmp_path, {"web": tls_program(tmp_path, preload=["supervisor.demo"])}) as sup:
        spare = spare_pid(sup)
        old = sup.status()["programs"][0]["tls"]["sha256"]
        write_cert(ca, tmp_path)
        sup.reload()
        new = sup.status()["programs"][0]["tls"]["sha256"]
        assert [(e["gen"], e["pid"]) for e in sup.events("template_spare_used")] == [(2, spare)]
        assert new != old and request_cert(tls=client(ca))[2] == new


def test_without_preload_spare_no_template_waits(tmp_path: Path) -> None:
    with supervisor(tmp_path, {"web": program(preload=["supervisor.demo"], preload_spare=False)}) as sup:
        sup.reload()
        assert [e["spare"] for e in sup.events("template_started")] == [False, False]
        wait_for("the serving template alone", lambda: len(templates(sup)) == 1)
