"""Stopping a healing run stops all of it, and one out_dir holds one run (compactify.heal_guard).

A launcher killed by SIGTERM or SIGKILL of its process group (as a shell or a notebook's
interrupt does) must leave no torchrun rank alive, and the newest complete checkpoint must
resume to the loss curve of an uninterrupted run; a second run on an out_dir that a live run
holds is refused before it starts anything.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compactify.heal import launch
from compactify.heal_data import HealError
from compactify.heal_guard import LOCK, acquire_lock, release_lock
from test_heal import heal_cfg, tiny, tiny_mpo  # noqa: F401  (module fixtures: a tiny model and its MPO version)

LAUNCHER = "import sys, yaml\nfrom compactify.heal import launch\n" \
           "launch(sys.argv[1], sys.argv[2], yaml.safe_load(open(sys.argv[3])), nproc=2)\n"


def _processes_naming(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                pids.append(int(d.name))
    return pids


@pytest.fixture(scope="module")
def long_cfg(tiny):
    return heal_cfg(tiny[2], steps=40, checkpoint_every=3, keep_checkpoints=1)


@pytest.fixture(scope="module")
def reference(tiny, tiny_mpo, long_cfg):
    return launch(tiny_mpo, tiny[0] / "guard_reference", long_cfg, nproc=2)["loss_curve"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_the_launcher_stops_every_rank_and_the_run_resumes(tiny_mpo, long_cfg, reference, tmp_path, sig):
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(long_cfg))
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tiny_mpo), str(out), str(cfg_file)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list((out / "checkpoints").glob("step_*/COMPLETE")):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, sig)  # the launcher's whole process group, as a shell's kill or Ctrl-C does
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while _processes_naming(str(out)) and time.time() < deadline:
        time.sleep(0.3)
    assert not _processes_naming(str(out)), "a rank outlived its launcher"
    assert not (out / "heal.json").exists()  # it was stopped mid-run
    resumed = launch(tiny_mpo, out, long_cfg, nproc=2)  # the dead run's lock is cleared
    assert resumed["resumed_from_step"] >= 3
    assert [c["step"] for c in resumed["loss_curve"]] == [c["step"] for c in reference]
    for a, b in zip(reference, resumed["loss_curve"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    assert not (out / LOCK).exists()


def test_a_second_run_on_a_live_runs_out_dir_is_refused(tiny, tiny_mpo, tmp_path):
    out = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        acquire_lock(out, pid=holder.pid)
        with pytest.raises(HealError, match=rf"held by a live healing run \(pid {holder.pid}.*another out_dir"):
            launch(tiny_mpo, out, heal_cfg(tiny[2]), nproc=2)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing started, nothing written
    finally:
        holder.kill()
        holder.wait()
    acquire_lock(out)  # its holder is dead: the stale lock is cleared and taken
    release_lock(out)
    assert not (out / LOCK).exists()
