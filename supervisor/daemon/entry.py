"""`supervisord`'s entry point: the master's imports begin here, asyncio's without OpenSSL
(system/openssl.py says why), then daemon/main.py runs."""


def main() -> int:
    from supervisor.system import openssl

    openssl.import_without_ssl("asyncio", "structlog")
    from supervisor.daemon.main import main as supervisord

    return supervisord()
