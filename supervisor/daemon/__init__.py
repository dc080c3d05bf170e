"""The daemon (`supervisord`): the master loop, what applies the model's decisions, its endpoints
(control socket, metrics) and the state handed over across an upgrade. The top layer."""
