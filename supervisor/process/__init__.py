"""One child process: a worker spawned with its listeners, the preload template that forks workers, and
the master's own re-exec for an upgrade in place."""
