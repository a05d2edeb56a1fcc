"""Fault injectors for tests/test_faults.py: broken audio files, fastai callbacks that poison a batch, pause a
training process (for an outside kill -9) or fill the disk at an exact step, a pickle that carries code, a real
full file system (a small tmpfs, when this process may mount one) and a simulated one (ENOSPC from os.write/fsync).

Run as a script it is the training process that gets killed:

    python tests/faults_helpers.py train-pause SPEC.json RUN_DIR MARKER EPOCH STEP
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf

# --- broken audio ---------------------------------------------------------------------------------------------
SR = 16000
BAD_KINDS = ("corrupt", "truncated", "empty", "zero_length", "nan")


def write_tone(path, seconds: float = 1.0, sr: int = SR, freq: float = 440.0, amp: float = 0.1) -> Path:
    "A sine tone as 16-bit PCM WAV."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(path, (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def break_audio(path, kind: str, seconds: float = 1.0, sr: int = SR, seed: int = 0) -> Path:
    """Overwrite `path` with a broken audio file of `kind`:
    corrupt (random bytes), truncated (a valid WAV cut in half: the header promises more than is there),
    empty (0 bytes), zero_length (a valid WAV header and no samples), nan (a float WAV holding NaN and inf)."""
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        write_tone(path, seconds, sr)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zero_length":
        sf.write(path, np.zeros(0, np.float32), sr, subtype="PCM_16")
    elif kind == "nan":
        x = (0.1 * np.sin(np.arange(int(seconds * sr)) / 10)).astype(np.float32)
        x[100], x[200] = np.nan, np.inf
        sf.write(path, x, sr, subtype="FLOAT")
    else:
        raise ValueError(f"unknown kind {kind!r}; kinds: {BAD_KINDS}")
    return path


# --- callbacks that inject faults into a fastai training loop -------------------------------------------------
def _callback_base():
    from fastai.callback.core import Callback
    return Callback


def _at(cb, epoch: int, step: int) -> bool:
    return cb.training and cb.epoch == epoch and cb.iter == step


def make_poison(epoch: int, step: int):
    "A callback that replaces the inputs of training batch `step` of `epoch` by NaN (after the front-end)."
    import torch
    class PoisonBatch(_callback_base()):
        order = 0   # after FeatureCallback (-3): the features are poisoned, the loss turns NaN
        def before_batch(self):
            if _at(self, epoch, step):
                self.learn.xb = (torch.full_like(self.learn.xb[0], float("nan")), *self.learn.xb[1:])
    return PoisonBatch()


def make_pause(epoch: int, step: int, marker):
    "A callback that, at training batch `step` of `epoch`, writes `marker` and waits to be killed."
    class PauseForKill(_callback_base()):
        def before_batch(self):
            if _at(self, epoch, step):
                Path(marker).write_text(f"{os.getpid()} {epoch} {step}\n")
                time.sleep(3600)
    return PauseForKill()


def make_action(epoch: int, step: int, action):
    "A callback that calls `action()` once, at training batch `step` of `epoch` (e.g. to fill the disk there)."
    class AtStep(_callback_base()):
        done = False
        def before_batch(self):
            if _at(self, epoch, step) and not self.done:
                self.done = True
                action()
    return AtStep()


# --- full disks -------------------------------------------------------------------------------------------------
def fill_disk(folder) -> Path:
    "Write a ballast file into `folder` until its file system has no byte left; returns the ballast's path."
    p = Path(folder) / f"ballast-{uuid.uuid4().hex[:6]}"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            buf = b"\0" * chunk
            while True:
                try: os.write(fd, buf)
                except OSError as e:
                    if e.errno != errno.ENOSPC: raise
                    break
    finally: os.close(fd)
    return p


@contextmanager
def tmpfs(folder, size: str = "16m"):
    """Mount a tmpfs of `size` on `folder` for the duration; yields the folder, or None if mounting is not allowed here
    (or AUDIOTL_FAULTS_NO_MOUNT=1 asks for the simulated full disk everywhere)."""
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    ok = False
    if mount and umount and hasattr(os, "geteuid") and os.geteuid() == 0 and not os.environ.get("AUDIOTL_FAULTS_NO_MOUNT"):
        r = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        ok = r.returncode == 0
    try: yield folder if ok else None
    finally:
        if ok: subprocess.run([umount, "-l", str(folder)], capture_output=True)


class SimulatedFullDisk:
    """Make `os.write` and `os.fsync` raise ENOSPC for files under `folder` (or all files) while active,
    the way a full disk fails them. Use with pytest's `monkeypatch`: `SimulatedFullDisk(monkeypatch, folder)`."""
    def __init__(self, monkeypatch, folder=None, name_prefix: str | None = None, active: bool = True):
        self.folder = None if folder is None else str(Path(folder).resolve())
        self.name_prefix, self.active, self.hits = name_prefix, active, 0
        real_write, real_fsync = os.write, os.fsync
        def target(fd) -> bool:
            if not self.active: return False
            try: name = os.readlink(f"/proc/self/fd/{fd}")
            except OSError: return self.folder is None
            if self.folder is not None and not name.startswith(self.folder + os.sep): return False
            return self.name_prefix is None or os.path.basename(name).startswith(self.name_prefix)
        def write(fd, data):
            if target(fd): self.hits += 1; raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)
        def fsync(fd):
            fd_ = fd if isinstance(fd, int) else fd.fileno()
            if target(fd_): self.hits += 1; raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)

    def fill(self): self.active = True
    def free(self): self.active = False


def leftovers(folder) -> list[str]:
    "Temporary files an atomic writer or a store build left behind under `folder`."
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.name.endswith(".tmp") or ".tmp-" in p.name)


# --- a pickle that carries code -------------------------------------------------------------------------------
class Payload:
    "Unpickling this object calls `open(marker, 'w')`, creating `marker`: code run by merely loading a file."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, "w"))


class ShellPayload:
    "Unpickling this object runs `touch marker` in a shell."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f"touch '{self.marker}'",))


def malicious_checkpoint(path, marker, state_dict=None) -> Path:
    "A file shaped like an audiotl_nb checkpoint whose pickle creates `marker` when loaded without weights_only."
    import torch
    obj = {"format": "audiotl_nb/1", "model": {"name": "cnn10"}, "state_dict": dict(state_dict or {}),
           "frontend": None, "labels": None, "extra": {"note": Payload(marker), "shell": ShellPayload(str(marker) + ".sh")}}
    torch.save(obj, path)
    return Path(path)


# --- the process that gets killed --------------------------------------------------------------------------------
def _train_pause(spec_file, run_dir, marker, epoch, step):
    import torch
    torch.set_num_threads(1)
    import warnings; warnings.simplefilter("ignore")
    from audiotl_nb.train.core import run_spec
    spec = json.loads(Path(spec_file).read_text())
    run_spec(spec, run_dir, cbs=[make_pause(int(epoch), int(step), marker)])
    return 0


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "train-pause": sys.exit(_train_pause(*args))
    raise SystemExit(f"unknown command {cmd!r}")
