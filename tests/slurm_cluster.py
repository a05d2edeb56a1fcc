"""A real single-node Slurm cluster on localhost for tests (no systemd, no cgroups, no accounting).

`LocalSlurm(base).start()` writes a slurm.conf into `base`, starts slurmctld and slurmd, and waits
until the node is idle; `.stop()` ends both. Client commands (sbatch, squeue, submitit) find the
cluster through the `SLURM_CONF` environment variable that `.env()` returns / `.activate()` sets.
If the Slurm daemons are missing and we are root, they are installed from Debian's packages.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]


def ensure_slurm_installed() -> str | None:
    "Install Slurm from Debian's packages if needed; return a reason string when it cannot be had."
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue")): return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0: return f"{' '.join(cmd)} failed: {r.stderr[-500:]}"
    return None


def _alive(pid: int) -> bool:
    try: stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError): return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class LocalSlurm:
    "One localhost node in partition `debug`, state under `base`."
    def __init__(self, base, port: int = 16817):
        self.base, self.port = Path(base).resolve(), port
        self.conf = self.base / "etc" / "slurm.conf"

    def env(self) -> dict: return {**os.environ, "SLURM_CONF": str(self.conf)}
    def activate(self): os.environ["SLURM_CONF"] = str(self.conf)

    def _write_conf(self):
        for d in ("etc", "state", "spool", "log", "run"): (self.base / d).mkdir(parents=True, exist_ok=True)
        mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024 - 1024
        b = self.base
        self.conf.write_text("\n".join([
            "ClusterName=audiotl", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={self.port}", f"SlurmdPort={self.port + 1}",
            "AuthType=auth/none", "CredType=cred/none",
            f"StateSaveLocation={b}/state", f"SlurmdSpoolDir={b}/spool",
            f"SlurmctldPidFile={b}/run/slurmctld.pid", f"SlurmdPidFile={b}/run/slurmd.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log", f"SlurmdLogFile={b}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "MpiDefault=none", "MailProg=/bin/true",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=512", "ReturnToService=2", "InactiveLimit=0", "KillWait=5", "MinJobAge=300",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def _pid(self, daemon) -> int:
        try: return int((self.base / "run" / f"{daemon}.pid").read_text())
        except (FileNotFoundError, ValueError): return 0

    def node_state(self) -> str:
        r = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=self.env(),
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip()

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self._write_conf()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env())
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", "localhost"], check=True, env=self.env())
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if self.node_state() == "idle": return self
            except subprocess.TimeoutExpired: pass
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-1500:] for p in (self.base / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"Slurm node did not become idle within {timeout}s\n{logs}")

    def stop(self):
        for d in ("slurmd", "slurmctld"):
            pid = self._pid(d)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                for _ in range(300):
                    if not _alive(pid): break
                    time.sleep(0.1)
                if _alive(pid): os.kill(pid, signal.SIGKILL)
            (self.base / "run" / f"{d}.pid").unlink(missing_ok=True)

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()
