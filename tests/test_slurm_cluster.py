"""The test Slurm cluster itself works: a job submitted with sbatch runs and writes its output."""
import subprocess
import time

import pytest



def test_sbatch_runs_a_job(slurm, tmp_path):
    out = tmp_path / "hello.txt"
    r = subprocess.run(["sbatch", "--parsable", "-o", str(tmp_path / "job.log"), "--wrap", f"echo hello > {out}"],
                       env=slurm.env(), capture_output=True, text=True, check=True)
    job = r.stdout.strip().split(";")[0]
    for _ in range(120):
        q = subprocess.run(["squeue", "-h", "-j", job], env=slurm.env(), capture_output=True, text=True)
        if not q.stdout.strip(): break
        time.sleep(0.5)
    assert out.read_text().strip() == "hello"
