"""One run at a time writes into an output (pipeline.lease): a second run is refused, a lapsed
lease is taken over, a run that lost its lease marks no more shards complete."""

from __future__ import annotations

import json
import os
import threading
import time

import fsspec
import pytest

from pipeline.config import PipelineConfig
from pipeline.lease import LEASE_FILE, OutputBusyError, RunLease
from pipeline.output import OutputDir
from pipeline.run import run_pipeline
from pipeline.shards import Shard
from pipeline.single_machine import SAMPLE_IMAGES

FAST = dict(renew_s=0.05, expiry_s=5.0, settle_s=0.05)


def lease_of(path, **kw):
    return RunLease(fsspec.filesystem("file"), str(path), **dict(FAST, **kw))


def write_lease(path, age_s, run_id="other"):
    path.mkdir(parents=True, exist_ok=True)
    (path / LEASE_FILE).write_text(json.dumps({"run_id": run_id, "host": "node-7", "pid": 4242,
                                               "started": time.time() - 600, "renewed": time.time() - age_s}))


def test_a_second_run_is_refused_until_the_first_ends(tmp_path):
    first = lease_of(tmp_path)
    with first:
        held = json.loads((tmp_path / LEASE_FILE).read_text())
        assert held["run_id"] == first.run_id and held["pid"] > 0
        time.sleep(0.2)
        assert json.loads((tmp_path / LEASE_FILE).read_text())["renewed"] > held["renewed"]  # renewed
        with pytest.raises(OutputBusyError, match=r"Another run is writing into this output \(run [0-9a-f]{8} on host"):
            lease_of(tmp_path).acquire()
        first.check()  # still ours
    assert not (tmp_path / LEASE_FILE).exists()  # released at the end
    with lease_of(tmp_path):
        pass


def test_a_lapsed_lease_is_taken_over_and_a_live_one_names_its_run(tmp_path, caplog):
    write_lease(tmp_path, age_s=1.0)
    with pytest.raises(OutputBusyError, match="host node-7, pid 4242.*lapses 4 s from now"):
        lease_of(tmp_path).acquire()
    write_lease(tmp_path, age_s=60.0)  # its driver was killed a minute ago
    with lease_of(tmp_path):
        assert "Taking over the lease of a run that stopped renewing it 60 s ago" in caplog.text
    (tmp_path / LEASE_FILE).write_text("{not json")
    with pytest.raises(OutputBusyError, match="not a lease this code wrote"):
        lease_of(tmp_path).acquire()


def test_a_lease_left_by_a_killed_run_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    """A driver killed with SIGKILL (or its process gone otherwise) cannot remove its lease; a run
    on the same host sees that its process is gone (or is another one under a reused pid)."""
    import socket
    import subprocess

    from pipeline.lease import process_start

    gone = subprocess.Popen(["true"])
    gone.wait()

    def held_by(pid, pid_start):
        (tmp_path / LEASE_FILE).write_text(json.dumps({
            "run_id": "killed", "host": socket.gethostname(), "pid": pid, "pid_start": pid_start,
            "started": time.time() - 60, "renewed": time.time() - 1}))

    held_by(os.getpid(), process_start(os.getpid()))  # alive: this very process
    with pytest.raises(OutputBusyError, match=r"Another run is writing.*or stop it \(process \d+ on this host\)"):
        lease_of(tmp_path).acquire()
    for pid, start in [(gone.pid, None), (os.getpid(), -1)]:  # ended; a reused pid
        held_by(pid, start)
        caplog.clear()
        with lease_of(tmp_path):
            assert "Taking over the lease of a run that ended without removing it (run killed on host" in caplog.text


def test_of_two_runs_starting_together_one_goes_on(tmp_path):
    """Both find the output free (each reads before the other writes), both write: one goes on."""
    both_looked = threading.Barrier(2)

    class Racing(RunLease):
        looked = False

        def _read(self):
            held = super()._read()
            if not self.looked:
                self.looked = True
                both_looked.wait(timeout=10)
            return held

    leases = [Racing(fsspec.filesystem("file"), str(tmp_path), **dict(FAST, settle_s=0.5)) for _ in range(2)]
    outcomes = [None, None]

    def start(i):
        try:
            leases[i].acquire()
            outcomes[i] = "holds"
        except OutputBusyError as e:
            outcomes[i] = str(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("holds") == 1, outcomes
    assert "at the same time" in next(o for o in outcomes if o != "holds")
    for lease in leases:
        lease.release()
    assert not (tmp_path / LEASE_FILE).exists()


def test_a_run_whose_lease_was_taken_over_marks_no_shard_complete(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    out.lease = lease_of(tmp_path / "out")
    out.lease.acquire()
    out.write_shard(Shard("s", "files", ("a.jpg",)), [], [])  # while it holds the lease
    write_lease(tmp_path / "out", age_s=0.0, run_id="newer")  # it stalled; another run took over
    time.sleep(0.3)
    with pytest.raises(OutputBusyError, match="another run took it over"):
        out.write_shard(Shard("t", "files", ("b.jpg",)), [], [])
    assert out.shard_ids() == ["s"]
    out.lease.release()
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["run_id"] == "newer"  # not ours to remove


def test_a_run_into_a_busy_output_is_refused_before_ray_starts_and_clears_nothing(tmp_path, monkeypatch, capsys):
    import ray

    import jobs.generate as job

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    out = tmp_path / "out"
    OutputDir(str(out)).write_shard(Shard("files-00000", "files", ("a.jpg",)), [], [])
    write_lease(out, age_s=2.0)
    cfg = PipelineConfig(input_uri=SAMPLE_IMAGES, output_uri=str(out), overwrite=True)
    with pytest.raises(OutputBusyError, match="Another run is writing into this output"):
        run_pipeline(cfg)
    assert OutputDir(str(out)).shard_ids() == ["files-00000"]  # --overwrite cleared nothing
    assert job.main(["--output", str(out), "--overwrite"]) == 1
    assert "error: Another run is writing into this output (run other on host node-7, pid 4242" in capsys.readouterr().err


def test_a_worker_process_checks_its_runs_lease_from_the_file(tmp_path):
    """A Ray task of a run (an export's) has no lease object: ``check_holder`` reads the file and
    raises once the lease is another run's, or gone."""
    from pipeline.lease import check_holder

    fs = fsspec.filesystem("file")
    with lease_of(tmp_path) as lease:
        check_holder(fs, str(tmp_path), lease.run_id)
        with pytest.raises(OutputBusyError, match="no longer this run's"):
            check_holder(fs, str(tmp_path), "another-run")
    with pytest.raises(OutputBusyError, match="it is gone"):
        check_holder(fs, str(tmp_path), lease.run_id)


def test_sigterm_or_ctrl_c_ends_a_run_as_an_error_does_and_releases_the_output(tmp_path, capsys):
    """SIGTERM (``ray job stop``, a pod being stopped) mid-run: the run stops as on an error (its
    record says so, the lease is released, so the next run starts at once), exit status 143;
    Ctrl-C the same, 130. The signal's handler is put back afterwards."""
    import signal

    from jobs.run_args import run_job
    from pipeline.run_records import read_runs, recorded, runs_report

    out = OutputDir(str(tmp_path / "out"))
    shard = Shard("files-00000", "files", ("a.jpg",), None)
    before = signal.getsignal(signal.SIGTERM)

    def start(stop):
        with out.hold_lease(), recorded(out, "generate", {}, [shard], []):
            stop()
            time.sleep(30)  # the signal's handler raises here
        pytest.fail("the run was not stopped")

    assert run_job(lambda: start(lambda: os.kill(os.getpid(), signal.SIGTERM)), out.uri) == 143
    assert capsys.readouterr().err == ("error: the run was stopped by SIGTERM; the shards it completed are kept, and "
                                       "running it again goes on\n")
    assert signal.getsignal(signal.SIGTERM) == before
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    [record] = read_runs(out)
    assert (record["status"], record["error"]) == ("stopped", "Terminated: stopped by SIGTERM")

    def ctrl_c():
        raise KeyboardInterrupt

    assert run_job(lambda: start(ctrl_c), out.uri) == 130
    assert "error: the run was stopped by Ctrl-C;" in capsys.readouterr().err
    assert [r["status"] for r in read_runs(out)] == ["stopped", "stopped"]
    assert sorted(line.split(", ", 1)[1].split(":", 1)[0] for line in runs_report(out, read_runs(out))) == [
        "stopped (KeyboardInterrupt", "stopped (Terminated"]
    assert not (tmp_path / "out" / LEASE_FILE).exists()
