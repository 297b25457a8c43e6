"""A throwaway one-node SLURM cluster on loopback, as a session-scoped pytest fixture.

The fixture installs ``slurm-wlm``/``munge`` when missing (``.ci/setup_slurm.sh``), then starts a private
munged, slurmctld and slurmd that share nothing with a system installation: key, sockets, state, spool and
logs all live in one temp dir, and the daemons listen on free loopback ports. Tests talk to the cluster
through :attr:`SlurmCluster.env` (``SLURM_CONF`` points at the generated ``slurm.conf``).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / ".ci" / "setup_slurm.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}

SLURM_CONF = """\
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
# Rescan often: a requeued job becomes eligible by the clock, not by an event that triggers scheduling.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The node may advertise more CPUs than the machine has, so small multi-task jobs fit side by side.
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
SlurmdTimeout=60
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mem_mb() -> int:
    total_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return max(1024, total_kb // 1024 - 1024)


def ensure_installed() -> str | None:
    """Install SLURM when missing; return a skip reason when that is impossible, else ``None``."""
    if all(shutil.which(b) for b in DAEMONS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge missing and cannot be installed here (needs root and apt-get)"
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not all(shutil.which(b) for b in DAEMONS):
        return f"installing slurm-wlm/munge failed: {proc.stderr.strip()[-500:]}"
    return None


@dataclass
class SlurmCluster:
    """Handle to the running cluster; ``env`` is the environment every SLURM command must use."""

    root: Path
    host: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` records for a job (one per array task), as key/value dicts."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float = 180, expect_tasks: int = 1) -> list[dict[str, str]]:
        """Block until all ``expect_tasks`` records of a job are in a final state; return them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = [r for r in self.jobs(job_id) if r.get("JobState") not in ("", None)]
            records = [r for r in records if "ArrayTaskId" not in r or "-" not in r["ArrayTaskId"]]
            if len(records) >= expect_tasks and all(r["JobState"] in FINAL_STATES for r in records):
                return records
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {self.jobs(job_id)}")

    def logs(self) -> str:
        """Tail of the daemon logs, for assertion messages."""
        parts = [f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log"))]
        return "\n".join(parts)

    def _start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        subprocess.run(
            [
                "munged",
                "--force",
                f"--socket={munge}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={munge}/munged.pid",
                f"--seed-file={munge}/munged.seed",
                f"--log-file={self.root}/log/munged.log",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        conf = Path(self.env["SLURM_CONF"])
        conf.write_text(
            SLURM_CONF.format(
                root=self.root,
                host=self.host,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                cpus=max(4, os.cpu_count() or 1),
                mem_mb=_mem_mb(),
            )
        )
        for cmd in (
            ["slurmctld", "-D", "-c", "-f", str(conf)],
            ["slurmd", "-D", "-f", str(conf), "-N", self.host],
        ):
            log = (self.root / "log" / f"{cmd[0]}.stdout").open("w")
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(1)
        self._wait_idle(timeout=60)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a SLURM daemon exited early\n{self.logs()}")
            state = self.run("sinfo", "-h", "-n", self.host, "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.host} not idle after {timeout}s\n{self.logs()}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons this cluster started, and stop its munged."""
        if self.procs and self.procs[0].poll() is None:
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run(
            ["munged", "--stop", f"--socket={self.root}/munge/munge.socket"],
            capture_output=True,
            timeout=30,
            check=False,
        )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster (partition ``debug``) for the whole test session."""
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the local SLURM test cluster runs slurmd as root; run the tests as root")
    root = Path(tempfile.mkdtemp(prefix="pytest-slurm-"))
    root.chmod(0o755)  # munged wants its socket reachable by everyone
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    cluster = SlurmCluster(root=root, host=socket.gethostname().split(".")[0], env=env)
    try:
        cluster._start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
