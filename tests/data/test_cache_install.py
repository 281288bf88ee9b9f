"""Installing a prepared cache beside other processes, and cleaning up after killed ones."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from finegrain.data import cache
from finegrain.data.cache import STALE_AFTER_SECONDS, install, remove_stale_partials, work_folder


def complete_folder(path, marker: str):
    path.mkdir(parents=True)
    (path / "who").write_text(marker)
    (path / ".complete").write_text("ok\n")
    return path


def test_a_cache_another_process_installed_first_is_kept(tmp_path):
    final = complete_folder(tmp_path / "prepared" / "key", "theirs")
    work = complete_folder(work_folder(final), "ours")
    assert install(work, final) == final
    assert (final / "who").read_text() == "theirs"
    assert not work.exists()


def test_an_incomplete_older_folder_is_replaced(tmp_path):
    final = tmp_path / "prepared" / "key"
    final.mkdir(parents=True)
    (final / "images.npy").write_text("half")
    work = complete_folder(work_folder(final), "ours")
    assert install(work, final) == final
    assert (final / "who").read_text() == "ours"
    assert not list(final.parent.glob(".*.tmp"))


def test_a_cache_completed_during_the_move_aside_is_put_back(tmp_path, monkeypatch):
    """The race the old code lost: the other process finishes between our check and our clean-up."""
    final = tmp_path / "prepared" / "key"
    final.mkdir(parents=True)
    work = complete_folder(work_folder(final), "ours")
    real_rename = os.rename
    calls = []

    def rename_after_the_other_finishes(self, target):  # our first rename fails: final is not empty
        calls.append((self.name, str(target)))
        if self == final and len(calls) == 2:  # moving the old one aside: it has just been completed
            (final / "who").write_text("theirs")
            (final / ".complete").write_text("ok\n")
        real_rename(self, target)
        return target

    monkeypatch.setattr(type(final), "rename", rename_after_the_other_finishes)
    (final / "old").write_text("x")
    assert install(work, final) == final
    assert (final / "who").read_text() == "theirs"
    assert not work.exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_work_folders_of_dead_processes_on_this_host_are_removed_live_ones_kept(tmp_path):
    prepared = tmp_path / "prepared"
    host = socket.gethostname()
    live = prepared / f".k.{os.getpid()}@{host}@aa.partial.tmp"
    dead = prepared / f".k.{dead_pid()}@{host}@bb.partial.tmp"
    dead_aside = prepared / f".k.{dead_pid()}@{host}@cc.stale.tmp"
    old_format_dead = prepared / f".k.{dead_pid()}-dd.partial.tmp"
    for p in (live, dead, dead_aside, old_format_dead):
        p.mkdir(parents=True)
    removed = remove_stale_partials(prepared)
    assert set(removed) == {dead, dead_aside, old_format_dead}
    assert live.exists()


def test_another_hosts_work_folder_is_judged_by_age_not_by_a_local_pid(tmp_path, monkeypatch):
    prepared = tmp_path / "prepared"
    fresh = prepared / f".k.{dead_pid()}@other-host@aa.partial.tmp"
    old = prepared / f".k.{dead_pid()}@other-host@bb.partial.tmp"
    for p in (fresh, old):
        p.mkdir(parents=True)
        (p / "images.npy").write_text("rows")
    past = time.time() - STALE_AFTER_SECONDS - 60
    for f in (old, old / "images.npy"):
        os.utime(f, (past, past))
    monkeypatch.setattr(cache.socket, "gethostname", lambda: "this-host")
    assert remove_stale_partials(prepared) == [old]
    assert fresh.exists()
