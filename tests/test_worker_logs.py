"""Worker log names: a machine that joins a sweep (``sweeper worker``, one per container under
compose) numbers its workers from 0 too, and often writes into the same shared logs folder, so
its logs carry the host's name (found by docker/check.sh: two containers wrote one worker-0.log)."""

from __future__ import annotations

import socket

from sweeper.launcher import log_name


def test_the_launching_machine_keeps_the_plain_names() -> None:
    assert log_name(0, join=False) == "worker-0.log" and log_name(3, join=False) == "worker-3.log"


def test_a_joining_machine_names_its_host_in_a_safe_file_name() -> None:
    name = log_name(0, join=True)
    assert name != log_name(0, join=False) and name.startswith("worker-0-") and name.endswith(".log")
    host = name[len("worker-0-"):-len(".log")]
    assert host and all(c.isalnum() or c in "._-" for c in host)
    assert host.replace("_", "") in socket.gethostname().replace("_", "")  # the host, with odd characters replaced
