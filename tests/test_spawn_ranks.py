"""The rank harness the multi-rank tests use: a hung rank is killed at the timeout, and its log says
where it was."""

from __future__ import annotations

import sys

from spawn_ranks import launch_ranks

HANG = "import time\ndef wait_for_a_peer():\n    time.sleep(120)\nwait_for_a_peer()\n"


def test_a_rank_hung_at_the_timeout_is_killed_with_its_stack_in_the_log(tmp_path):
    ranks = launch_ranks([sys.executable, "-c", HANG], 2, tmp_path, timeout=3)
    assert ranks[0][0] is None  # the rank the timeout was spent on
    assert ranks[1][0] is not None and ranks[1][0] != 0
    for _, log in ranks:
        assert "most recent call first" in log and "wait_for_a_peer" in log, log


def test_ranks_that_finish_report_their_exit_codes(tmp_path):
    ranks = launch_ranks([sys.executable, "-c", "import os, sys; sys.exit(int(os.environ['RANK']))"], 2,
                         tmp_path, timeout=60)
    assert [code for code, _ in ranks] == [0, 1]
