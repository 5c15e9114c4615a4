# Licensed to the Apache Software Foundation (ASF) under the Apache License,
# Version 2.0; see /usr/share/doc/cloudstack-image-server/copyright.
"""Replaces this process with /usr/bin/cloudstack-image-server.

The CloudStack KVM agent runs, as the transient unit cloudstack-image-server:
    python3 -m imageserver --listen ADDR --port 54322
        [--tls-enabled --tls-cert-file CRT --tls-key-file KEY]
exec keeps the process id, so the unit tracks the Rust server itself:
`systemctl stop` sends it SIGTERM and `systemctl is-active` sees it.

The command line becomes
    /usr/bin/cloudstack-image-server $CSIS_AGENT_ARGS <the agent's arguments>
CSIS_AGENT_ARGS (operator flags such as --max-requests 32) and RUST_LOG come
from /etc/default/cloudstack-image-server (.deb) or
/etc/sysconfig/cloudstack-image-server (.rpm), read as systemd reads an
EnvironmentFile=. The agent's arguments come last and are passed unchanged:
where a flag is given twice, the server takes the last one, so the agent's
--listen, --port and TLS flags win.
"""

import os
import shlex
import sys

BINARY = "/usr/bin/cloudstack-image-server"
ENV_FILES = (
    "/etc/default/cloudstack-image-server",
    "/etc/sysconfig/cloudstack-image-server",
)


def read_env_file(path):
    """KEY=VALUE assignments of an environment file; {} if it is missing."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    found = {}
    for number, line in enumerate(lines, 1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            print("imageserver: %s:%d ignored: %s" % (path, number, e), file=sys.stderr)
            continue
        if len(words) == 1 and "=" in words[0]:
            key, _, value = words[0].partition("=")
            if key.isidentifier():
                found[key] = value
    return found


def main():
    settings = {}
    for path in ENV_FILES:
        settings.update(read_env_file(path))
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    if settings.get("RUST_LOG"):
        env["RUST_LOG"] = settings["RUST_LOG"]
    argv = [BINARY] + settings.get("CSIS_AGENT_ARGS", "").split() + sys.argv[1:]
    sys.stdout.flush()
    try:
        os.execve(BINARY, argv, env)
    except OSError as e:
        print("imageserver: cannot run %s: %s" % (BINARY, e), file=sys.stderr)
        sys.exit(1)


main()
