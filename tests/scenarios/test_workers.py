"""Worker lifecycle: crashes, FATAL, scaling, signals, orphans, privileges, readiness, recycling."""

from __future__ import annotations

import grp
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from supervisor.system import migrate
from tests.harness import (
    BIN,
    PYTHON,
    Supervisor,
    collect,
    listening_inodes,
    open_requests,
    program,
    request,
    running,
    supervisor,
    wait_for,
)
from tests.load import Clients

pytestmark = pytest.mark.usefixtures("netns")
APPS = Path(__file__).resolve().parents[1] / "apps"


def crash_with_queue(tmp_path: Path, migrate: str,
                     accept_queue: str = "per-worker") -> tuple[dict[str, int], Supervisor]:
    """Worker 0 frozen with requests queued in its listener (or in the one both workers share), then SIGKILLed."""
    sup = Supervisor(tmp_path, {"web": program(accept_queue=accept_queue)}, migrate=migrate).start()
    try:
        victim = sup.workers()[0]["pid"]
        os.kill(victim, signal.SIGSTOP)
        socks = open_requests(200)  # about half hash to the frozen worker's listener
        os.kill(victim, signal.SIGKILL)
        outcomes, _ = collect(socks)
        return dict(outcomes), sup
    except BaseException:
        sup.kill()
        raise


@pytest.mark.parametrize("accept_queue", ["per-worker", "shared"])
def test_crashed_worker_queue_moves_to_its_siblings(tmp_path: Path, accept_queue: str) -> None:
    """SIGKILL a frozen worker: every connection waiting in its listener is served; it is replaced. A
    shared listener is the sibling's too: it stays, and the replacement gets it (the kernel's inode)."""
    outcomes, sup = crash_with_queue(tmp_path, "require", accept_queue)
    try:
        listening = listening_inodes()
        assert outcomes == {"ok": 200}
        wait_for("the replacement", lambda: len(sup.workers()) == 2 and sup.serving())
        if accept_queue == "shared":
            assert len(listening) == 1 and listening_inodes() == listening
        replaced = next(w for w in sup.workers() if w["worker"] == 0)
        assert replaced["restarts"] == 1 and replaced["last_exit"] == "killed by SIGKILL"
        assert "killed by SIGKILL" in sup.ctl("status").stdout
    finally:
        sup.kill()


def test_crash_without_migration_loses_the_queue(tmp_path: Path) -> None:
    """Control: with migrate off the same crash resets what waited in the dead worker's listener."""
    outcomes, sup = crash_with_queue(tmp_path, "off")
    sup.kill()
    assert outcomes.get("reset", 0) > 0, outcomes


def test_a_program_that_keeps_crashing_is_fatal_and_its_siblings_serve(tmp_path: Path) -> None:
    """Worker 1 crashes after every start: after crash_limit crashes the program is FATAL, worker 0 serves."""
    crasher = [PYTHON, str(APPS / "ready_then.py"), "crash-worker-1"]
    with supervisor(tmp_path, {"web": program(crasher, crash_limit=3, crash_window=60)}) as sup:
        wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal", timeout=20)
        log = sup.log_text()
        assert log.count('"worker_crashed"') == 3 and '"program_fatal"' in log and "worker 1 gives up" in log
        assert [w["worker"] for w in sup.workers()] == [0]
        assert all(request()[0] == 200 for _ in range(20))
        assert "fatal" in sup.ctl("status").stdout
        assert sup.ctl("reload").returncode == 0  # a reload clears FATAL and tries again
        assert sup.status()["programs"][0]["state"] == "serving"


@pytest.mark.parametrize("accept_queue", ["per-worker", "shared"])
def test_a_fatal_program_with_no_worker_left_refuses_connections_at_once(tmp_path: Path, accept_queue: str) -> None:
    """Its only worker keeps crashing: once FATAL nothing is left listening (the shared listener is shut
    too, not left to queue connections nobody accepts), so a client is refused at once instead of
    waiting; a reload brings it back."""
    crasher = [PYTHON, str(APPS / "ready_then.py"), "crash-worker-0"]
    settings = program(crasher, workers=1, crash_limit=2, crash_window=60, accept_queue=accept_queue)
    with supervisor(tmp_path, {"web": settings}) as sup:
        wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal", timeout=20)
        wait_for("no worker", lambda: not sup.workers())
        assert listening_inodes() == []
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            request(timeout=5)
        assert time.monotonic() - started < 1
        sup.write({"web": program(workers=1, accept_queue=accept_queue)})
        assert sup.ctl("reload").returncode == 0
        assert request()[0] == 200


def test_a_shared_listener_has_room_for_every_worker(tmp_path: Path) -> None:
    """`backlog` is each worker's room: one queue per worker gets it on each listener, one shared queue
    gets it times the workers, and the workers are told the backlog they find (SUPERVISOR_BACKLOG)."""
    programs = {"web": program(workers=3, backlog=100),
                "api": program(workers=3, backlog=100, accept_queue="per-worker", listen=["127.0.0.1:8001"])}
    with supervisor(tmp_path, programs) as sup:
        listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
        backlogs = sorted((line.split()[3], int(line.split()[2])) for line in listening.splitlines())
        assert backlogs == [("127.0.0.1:8000", 300), *[("127.0.0.1:8001", 100)] * 3], backlogs
        told = {name: Path(f"/proc/{sup.workers(name)[0]['pid']}/environ").read_bytes().split(b"\0")
                for name in programs}
        assert b"SUPERVISOR_BACKLOG=300" in told["web"] and b"SUPERVISOR_BACKLOG=100" in told["api"]


def kill_worker(sup: Supervisor, index: int) -> None:
    """SIGKILL worker `index` of the newest generation (right after a reload, the old one's may still exit)."""
    newest = max((w for w in sup.workers() if w["worker"] == index), key=lambda w: w["generation"])
    os.kill(newest["pid"], signal.SIGKILL)


def test_start_revives_a_fatal_program(tmp_path: Path) -> None:
    """`start` on a FATAL program starts a new generation the normal way; the FATAL one retires."""
    with supervisor(tmp_path, {"web": program(workers=3, crash_limit=2)}) as sup:
        kill_worker(sup, 0)
        kill_worker(sup, 1)
        wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal")
        fatal = [w["pid"] for w in sup.workers()]
        start = sup.ctl("start", "web")
        assert start.returncode == 0, start.stdout + start.stderr
        assert sup.status()["programs"][0]["state"] == "serving"
        assert request()[1]["generation"] == 2
        wait_for("the FATAL generation's workers to exit", lambda: not any(running(pid) for pid in fatal))
        assert sup.serving() and [w["generation"] for w in sup.workers()] == [2, 2, 2]


def test_stop_on_a_fatal_program_leaves_it_stopped_not_fatal(tmp_path: Path) -> None:
    with supervisor(tmp_path, {"web": program(workers=3, crash_limit=2)}) as sup:
        kill_worker(sup, 0)
        kill_worker(sup, 1)
        wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal")
        assert sup.ctl("stop", "web").returncode == 0
        [web] = sup.status()["programs"]
        assert web["state"] == "stopped" and web["fatal"] is None, web
        assert "FATAL" not in sup.ctl("status").stdout
        sup.reload()  # a stopped program stays stopped
        assert sup.status()["programs"][0]["state"] == "stopped"
        assert sup.ctl("start", "web").returncode == 0 and request()[0] == 200


def test_a_reload_after_fatal_starts_the_crash_count_over(tmp_path: Path) -> None:
    """After FATAL and a reload that works, one crash is restarted, not FATAL; the new crash_limit counts."""
    crasher = [PYTHON, str(APPS / "ready_then.py"), "crash-worker-1"]
    with supervisor(tmp_path, {"web": program(crasher, crash_limit=3, crash_window=60)}) as sup:
        wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal", timeout=20)
        sup.write({"web": program(crash_limit=2, crash_window=60)})
        sup.reload()
        kill_worker(sup, 0)
        wait_for("the restarted worker", lambda: sup.serving() and any(w["restarts"] == 1 for w in sup.workers()))
        assert sup.status()["programs"][0]["state"] == "serving"
        kill_worker(sup, 1)  # the second crash within crash_window: the reloaded config's crash_limit is 2
        wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal")


@pytest.mark.parametrize(("keep_alive", "accept_queue"), [(False, "per-worker"), (True, "per-worker"),
                                                          (False, "shared"), (True, "shared")],
                         ids=["new connections", "keep-alive", "shared-new connections", "shared-keep-alive"])
def test_scaling_under_load_fails_no_connection(tmp_path: Path, keep_alive: bool, accept_queue: str) -> None:
    """TTIN/TTOU and `scale` add workers on fresh listeners or retire them with their queues migrated; a
    retired worker's kept connections end with an answer that says `Connection: close`. With one shared
    queue, every worker started or retired leaves the generation's one listener as it was."""
    with supervisor(tmp_path, {"web": program(graceful_timeout=2, accept_queue=accept_queue)}) as sup, \
            Clients("127.0.0.1:8000", concurrency=64 if keep_alive else 16, keep_alive=keep_alive,
                    method="POST" if keep_alive else "GET") as load:
        assert sup.proc is not None
        listening = listening_inodes()
        sup.proc.send_signal(signal.SIGTTIN)
        wait_for("3 ready workers", lambda: len(sup.workers()) == 3 and sup.serving())
        sup.proc.send_signal(signal.SIGTTOU)
        wait_for("2 workers", lambda: len(sup.workers()) == 2)
        for count in (5, 1, 3):
            result = sup.ctl("scale", "web", str(count))
            assert result.returncode == 0, result.stderr

            def scaled(c: int = count) -> bool:
                return len(sup.workers()) == c and sup.serving()

            wait_for(f"{count} workers", scaled)
            if accept_queue == "shared":
                assert listening_inodes() == listening
        assert sup.ctl("scale", "web", "0").returncode == 1
        tally = load.finish()
    print(f"\n{tally.describe()}")
    assert not tally.failures, tally.describe()
    assert tally.connections > 500


def test_scale_up_then_down_back_to_back_under_load_fails_no_worker_and_no_connection(tmp_path: Path) -> None:
    """`scale web 4` then `scale web 1` at once: the workers still starting are never handed a listener
    already shut; each becomes ready, then leaves with its queue migrated."""
    with supervisor(tmp_path, {"web": program(graceful_timeout=2)}) as sup, \
            Clients("127.0.0.1:8000", concurrency=64) as load:
        time.sleep(0.3)
        up = sup.request("scale", program="web", workers=4)
        down = sup.request("scale", program="web", workers=1)  # while the new workers start
        assert up["ok"] and down["ok"] and "2 leaving once ready" in down["message"], (up, down)
        wait_for("1 worker", lambda: len(sup.workers()) == 1 and sup.serving())
        time.sleep(0.5)
        tally = load.finish()
    assert not tally.failures and tally.connections > 100, tally.describe()
    assert {e["status"] for e in sup.events("worker_exited")} == {"exit status 0"}
    assert "not a listening stream socket" not in sup.log_text()


def test_ten_ttin_during_a_reload_give_ten_workers_more_after_it(tmp_path: Path) -> None:
    """Each signal waits behind the reload and counts from what it left (they all used to say "2")."""
    slow = [PYTHON, "-c", (
        "import os, runpy, sys, time\n"
        "if os.environ['SUPERVISOR_GENERATION'] == '2': time.sleep(2)\n"
        "sys.argv = ['demo']; runpy.run_module('supervisor.demo', run_name='__main__')\n")]
    with supervisor(tmp_path, {"web": program(slow, workers=1)}) as sup:
        assert sup.proc is not None
        reload = sup.ctl_async("reload")
        wait_for("the reload in progress", lambda: sup.status()["reloading"])  # generation 2 takes 2 s
        for n in range(1, 11):  # one at a time: the kernel keeps one of a signal pending, not ten
            sup.proc.send_signal(signal.SIGTTIN)

            def received(count: int = n) -> bool:
                return len(sup.events("signal")) == count

            wait_for(f"TTIN {n} received", received)
        assert sup.status()["reloading"], "the reload ended before the tenth signal: the test proves nothing"
        assert reload.wait(30) == 0
        wait_for("11 ready workers of generation 2", lambda: len(sup.workers()) == 11 and sup.serving(), timeout=20)
        assert {w["generation"] for w in sup.workers()} == {2}


def test_usr1_reopens_the_log_file(tmp_path: Path) -> None:
    """After logrotate moves the file, SIGUSR1 makes supervisord write to a new one."""
    log = tmp_path / "supervisord.log"
    sup = Supervisor(tmp_path, {"web": program(workers=1)})
    proc = subprocess.Popen([str(BIN / "supervisord"), "-c", str(sup.config), "--log-file", str(log)])
    try:
        wait_for("a log line", lambda: log.exists() and "supervisord_started" in log.read_text())
        log.rename(tmp_path / "supervisord.log.1")
        proc.send_signal(signal.SIGUSR1)
        wait_for("the reopened file", log.exists)
        assert sup.ctl("reload").returncode == 0
        wait_for("reload lines in the new file", lambda: "reload_done" in log.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert "supervisord_stopped" in log.read_text()
    assert "reload_done" not in (tmp_path / "supervisord.log.1").read_text()


def test_workers_die_with_the_master_and_take_their_children(tmp_path: Path) -> None:
    """SIGKILL of supervisord kills its workers (parent-death signal); a stopped worker's children go too."""
    child_file = tmp_path / "child.pid"
    forker = [PYTHON, str(APPS / "ready_then.py"), "fork", str(child_file)]
    with supervisor(tmp_path, {"web": program(forker, workers=1), "api": program(listen=["127.0.0.1:8001"])}) as sup:
        child = int(child_file.read_text())
        assert sup.ctl("stop", "web").returncode == 0
        wait_for("the worker's child to be gone", lambda: not running(child))
        workers = [w["pid"] for w in sup.workers("api")]
        assert sup.proc is not None
        sup.proc.kill()
        sup.proc.wait()
        wait_for("workers to die with the master", lambda: not any(running(pid) for pid in workers))



def test_workers_run_unprivileged_on_a_privileged_port(tmp_path: Path) -> None:
    """The master binds port 443 as root; the workers run as nobody with the configured umask."""
    with supervisor(tmp_path, {"web": program(listen=["127.0.0.1:443"], user="nobody", umask="027", cwd="/")}) as sup:
        pids = [w["pid"] for w in sup.workers()]
        assert request(("127.0.0.1", 443))[0] == 200
        for pid in pids:
            proc = psutil.Process(pid)
            assert proc.username() == "nobody" and proc.uids().effective == proc.uids().real
            status = Path(f"/proc/{pid}/status").read_text()
            assert "Umask:\t0027" in status
            assert proc.environ()["USER"] == "nobody" and proc.environ()["HOME"] != "/root"


def test_unknown_user_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """Preflight names the program and the user; supervisord exits 2."""
    sup = Supervisor(tmp_path, {"web": program(user="no-such-user")})
    assert sup.exit_status_of_refused_start() == 2
    assert "web: user 'no-such-user' does not exist" in sup.log_text()


def test_accepting_readiness_waits_for_the_listener_to_be_polled(tmp_path: Path) -> None:
    """A worker that is alive but never polls its listener is not ready: the reload rolls back."""
    idle = [PYTHON, "-c", "import time; time.sleep(60)"]
    with supervisor(tmp_path, {"web": program()}) as sup:
        sup.write({"web": program(idle, ready="accepting", settle=0.1, ready_timeout=1.5)})
        result = sup.ctl("reload")
        assert result.returncode == 1 and "not ready within 1.5 s" in result.stderr
        sup.write({"web": program(idle, ready="settle", settle=0.2)})
        assert sup.ctl("reload").returncode == 0  # settle only asks that it stays alive


@pytest.mark.parametrize(("keep_alive", "accept_queue"), [(False, "per-worker"), (True, "per-worker"),
                                                          (False, "shared"), (True, "shared")],
                         ids=["new connections", "keep-alive", "shared-new connections", "shared-keep-alive"])
def test_max_age_recycles_workers_without_a_failed_connection(tmp_path: Path, keep_alive: bool,
                                                              accept_queue: str) -> None:
    """Workers older than max_age are replaced one by one: new listener first, then the old one shut (with
    one shared queue: the replacement accepts from the same listener, which stays); a recycled worker's
    kept connections end with an answer that says `Connection: close`."""
    settings = program(max_age=1, graceful_timeout=2, accept_queue=accept_queue)
    with supervisor(tmp_path, {"web": settings}) as sup, \
            Clients("127.0.0.1:8000", concurrency=64 if keep_alive else 16, keep_alive=keep_alive) as load:
        first, listening = {w["pid"] for w in sup.workers()}, listening_inodes()
        wait_for("three rounds of recycling", lambda: sup.log_text().count('"worker_recycled"') >= 6, timeout=20)
        assert not first & {w["pid"] for w in sup.workers()}
        assert sup.generation() == 1  # recycling stays within the generation
        if accept_queue == "shared":
            assert len(listening) == 1 and listening_inodes() == listening
        tally = load.finish()
    print(f"\n{tally.describe()}")
    assert not tally.failures, tally.describe()
    assert len(tally.pids) >= 6, tally.pids  # the recycled workers served


def test_max_rss_recycles(tmp_path: Path) -> None:
    """A worker above max_rss is replaced, and the reason is logged."""
    with supervisor(tmp_path, {"web": program(workers=1, max_rss="1M")}) as sup:
        wait_for("a recycle", lambda: '"worker_recycled"' in sup.log_text(), timeout=15)
        assert "max_rss 1 MiB" in sup.log_text()
        assert json.loads(sup.ctl("status", "--json").stdout)["programs"][0]["state"] == "serving"


def test_env_cwd_and_group_reach_the_worker(tmp_path: Path) -> None:
    """`env` is added to the environment, `cwd` (relative to the config file) is the working directory,
    the default one is the config's folder; `group` alone keeps root with that group and no others."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "app").mkdir()
    nogroup = grp.getgrnam("nogroup").gr_gid
    recorder = [PYTHON, "-S", "-I", str(APPS / "recorder.py"), str(out)]
    programs = {"web": program(recorder, workers=1, env={"APP_ENV": "production", "PORT": 8000}, cwd="app",
                               group="nogroup"),
                "api": program(recorder, workers=1, listen=["127.0.0.1:8001"])}
    with supervisor(tmp_path, programs) as sup:
        web, api = ([json.loads((out / f"{w['pid']}.json").read_text()) for w in sup.workers(name)]
                    for name in ("web", "api"))
    [web], [api] = web, api
    assert web["environ"]["APP_ENV"] == "production" and web["environ"]["PORT"] == "8000"
    assert "APP_ENV" not in api["environ"]
    assert web["environ"]["SUPERVISOR_PROGRAM"] == "web" and "PATH" in web["environ"]  # added, not replacing
    assert web["cwd"] == str(tmp_path / "app") and api["cwd"] == str(tmp_path)
    assert (web["uid"], web["gid"], web["groups"]) == (0, nogroup, [])
    assert (api["uid"], api["gid"]) == (0, 0)


def test_a_restarted_worker_that_is_never_ready_is_killed_and_retried(tmp_path: Path) -> None:
    """Worker 1 crashes; each restart hangs before READY=1: it is killed after ready_timeout with its
    listener shut (its queue moves to worker 0), restarted after 0.1, 0.2, 0.4 s, then FATAL at
    crash_limit; worker 0 serves throughout and no connection fails."""
    hang = [PYTHON, str(APPS / "ready_then.py"), "hang-on-restart", str(tmp_path)]
    # per-worker: the never-ready worker has a queue of its own, which its kill migrates
    with supervisor(tmp_path, {"web": program(hang, ready_timeout=1, crash_limit=4, accept_queue="per-worker")}) as sup:
        before = migrate.counters()
        kill_worker(sup, 1)  # before the load: what a killed worker had accepted is lost, not the point here
        with Clients("127.0.0.1:8000", concurrency=16) as load:
            wait_for("FATAL", lambda: sup.status()["programs"][0]["state"] == "fatal", timeout=20)
            fatal = time.monotonic()
            time.sleep(1.0)  # answers after FATAL
            tally = load.finish()
        [serving] = sup.workers()
        assert tally.pids[serving["pid"]][1] > fatal, "no answer after FATAL"
        assert serving["worker"] == 0 and serving["state"] == "ready" and serving["restarts"] == 0
    assert (migrate.counters() - before).success > 0, "no connection waited in a never-ready worker's listener"
    not_ready = sup.events("worker_not_ready")
    assert [(e["worker"], e["timeout"]) for e in not_ready] == [(1, 1.0)] * 3, not_ready
    assert not any(running(e["pid"]) for e in not_ready)
    respawns = sup.events("worker_respawn_scheduled")
    assert [(e["worker"], e["delay"], e["restarts"]) for e in respawns] == [(1, 0.1, 1), (1, 0.2, 2), (1, 0.4, 3)]
    crashed = sup.events("worker_crashed")
    assert [(e["worker"], e["status"]) for e in crashed] == [(1, "killed by SIGKILL")] * 4
    assert "worker 1 restarted: loading forever" in sup.log_text()
    assert not tally.failures, tally.describe()
    assert set(tally.generations) == {1}
