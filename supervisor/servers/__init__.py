"""The worker side: what a server needs to run under supervisord, and the runners that give it to uvicorn
and hypercorn (`python -m supervisor.servers.uvicorn APP`, `python -m supervisor.servers.hypercorn APP`).

`activation` reads the listeners a worker inherits (LISTEN_FDS) and tells supervisord it serves
(sd_notify `READY=1`); `stopping` is the stop contract's timing rule. Nothing here imports the rest of the
package: a worker needs nothing of the supervisor, and the demo (`supervisor.demo`) imports only this.
"""
