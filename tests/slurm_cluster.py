"""A real two-node SLURM cluster on this one machine, for testing the ``slurm/`` job scripts.

Debian's SLURM 22.05 packages (``slurmctld``, ``slurmd``, ``slurm-client``, ``munge``) run
without systemd or cgroups, and their ``slurmd`` is built with multiple-slurmd support: two
``slurmd -N nodeK`` daemons on different ports, each with its own loopback address, make a
two-node cluster on one host. Everything the cluster writes (config, state, spool, logs, munge
socket and key) lives under one temporary directory; the only thing touched outside it is a
marked block in ``/etc/hosts`` so that the node names resolve (torchrun and the trainer use
the first node's name as the rendezvous host). ``stop()`` undoes both.

Only root on a machine with apt can install the packages; ``unavailable_reason()`` says why a
machine cannot host the cluster so the tests can skip with that reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain_runs import free_port

log = logging.getLogger(__name__)

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged", "sinfo", "sbatch", "scontrol", "munge")
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# vlpretrain test SLURM cluster"
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
}


class ClusterError(RuntimeError):
    """The cluster could not be started or a job could not be followed; the message carries logs."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run the test cluster, or None when it can (possibly after apt)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the SLURM test cluster needs root (it installs packages and starts daemons)"
    if not os.access(HOSTS_FILE, os.W_OK):
        return f"the SLURM test cluster names its nodes in {HOSTS_FILE}, which is not writable here"
    if all(shutil.which(name) for name in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def install_packages(timeout_s: float = 600) -> str | None:
    """Install the Debian SLURM and munge packages unless present; return a reason on failure."""
    if all(shutil.which(name) for name in DAEMONS):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        log.info("running %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f} s"
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            return f"`{' '.join(cmd)}` failed (exit {done.returncode}): " + " | ".join(tail)
    missing = [name for name in DAEMONS if not shutil.which(name)]
    return f"installed {' '.join(PACKAGES)} but still missing {missing}" if missing else None




def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"--- {path}: (missing)"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text)


@dataclass(frozen=True)
class Node:
    name: str
    addr: str
    port: int


class SlurmCluster:
    """One slurmctld and ``len(nodes)`` slurmd daemons sharing this host's network stack."""

    def __init__(self, root: Path, num_nodes: int = 2, requeue_delay_s: int = 5):
        self.root = Path(root)
        self.cpus_per_node = max(1, min(2, os.cpu_count() or 1))
        # A requeued job may start again only after its old credential expires (cred_expire,
        # 120 s by default); the tests requeue, so keep it short.
        self.requeue_delay_s = requeue_delay_s
        self.ctld_port = free_port()
        self.nodes = [Node(f"node{k}", f"127.0.0.{10 + k}", free_port()) for k in range(1, num_nodes + 1)]
        self.munge_dir = self.root / "munge"
        self.conf = self.root / "slurm.conf"
        self._procs: dict[str, subprocess.Popen] = {}
        self._hosts_added = False

    # ------------------------------------------------------------------ environment
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for client commands and submitted jobs: points at this cluster only.

        SLURM_* variables of an enclosing job (tests run inside a real allocation) are dropped,
        or the submitted jobs would inherit that job's ranks and node lists.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(self, *cmd: str, check: bool = True, timeout_s: float = 30, env=None) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        done = subprocess.run(
            list(cmd), env=env or self.env(), capture_output=True, text=True, timeout=timeout_s
        )
        if check and done.returncode != 0:
            raise ClusterError(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()}\n{self.logs()}"
            )
        return done

    def logs(self) -> str:
        """Tails of every daemon log, for failure messages."""
        paths = [self.root / "slurmctld.log", self.munge_dir / "munged.log"]
        paths += [self.root / f"slurmd-{node.name}.log" for node in self.nodes]
        return "\n".join(_tail(path) for path in paths)

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout_s: float = 60) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (not root) must reach its socket below it
        self._add_hosts()
        self._start_munge(timeout_s)
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._wait(lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, timeout_s, "slurmctld to answer ping")
        for node in self.nodes:
            self._spawn(f"slurmd-{node.name}", ["slurmd", "-D", "-f", str(self.conf), "-N", node.name])
        self._wait(self._all_nodes_idle, timeout_s, f"nodes {[n.name for n in self.nodes]} to become idle")
        log.info("SLURM test cluster up under %s", self.root)

    def stop(self) -> None:
        """Cancel leftover jobs, stop the daemons we started, restore /etc/hosts. Safe to repeat."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)  # harmless when none
            time.sleep(1)
        for name in reversed(list(self._procs)):  # slurmds, then slurmctld, then munged
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
                    proc.kill()
                    proc.wait(timeout=15)
        self._remove_hosts()

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        out = open(self.root / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(), **kwargs
        )
        out.close()

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [name for name, proc in self._procs.items() if proc.poll() is not None]
            if dead:
                raise ClusterError(f"{dead} exited while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.logs()}")

    def _all_nodes_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return all(states.get(node.name) == "idle" for node in self.nodes)

    # ------------------------------------------------------------------ munge
    def _start_munge(self, timeout_s: float) -> None:
        """munged refuses to run as root: it runs as the munge user on a key of its own."""
        import pwd

        munge_user = pwd.getpwnam("munge")
        self.munge_dir.mkdir(exist_ok=True)
        os.chown(self.munge_dir, munge_user.pw_uid, munge_user.pw_gid)
        self.munge_dir.chmod(0o755)  # clients need execute permission to reach the socket
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
        key.chmod(0o400)
        socket_path = self.munge_dir / "munge.socket"
        cmd = [
            "munged", "--foreground", f"--key-file={key}", f"--socket={socket_path}",
            f"--pid-file={self.munge_dir / 'munged.pid'}", f"--seed-file={self.munge_dir / 'munged.seed'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
        ]
        self._spawn("munged", cmd, user=munge_user.pw_uid, group=munge_user.pw_gid, extra_groups=[])

        def credential_roundtrip() -> bool:
            if not socket_path.exists():
                return False
            encode = subprocess.run(["munge", "-n", "-S", str(socket_path)], capture_output=True, timeout=10)
            if encode.returncode != 0:
                return False
            decode = subprocess.run(["unmunge", "-S", str(socket_path)], input=encode.stdout, capture_output=True, timeout=10)
            return decode.returncode == 0

        self._wait(credential_roundtrip, timeout_s, "munged to encode and decode a credential")

    # ------------------------------------------------------------------ config and /etc/hosts
    def _write_conf(self) -> None:
        root = self.root
        (root / "state").mkdir(exist_ok=True)
        lines = [
            "ClusterName=vlptest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_dir / 'munge.socket'},cred_expire={self.requeue_delay_s}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool-%n'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd-%n.log'}",
            # No cgroups and no systemd here: track processes by their parent links.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "JobRequeue=1",
            "ReturnToService=2",
            "SchedulerType=sched/builtin",
            # A requeued job becomes eligible with no event to wake the scheduler: poll often.
            "SchedulerParameters=sched_interval=2",
            "KillWait=10",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job` (no slurmdbd)
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
        ]
        hostname = socket.gethostname()
        for node in self.nodes:
            lines.append(
                f"NodeName={node.name} NodeAddr={node.addr} NodeHostname={hostname} Port={node.port} "
                f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            )
        names = ",".join(node.name for node in self.nodes)
        lines.append(f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _add_hosts(self) -> None:
        text = HOSTS_FILE.read_text()
        wanted = [f"{node.addr} {node.name} {HOSTS_MARK}" for node in self.nodes]
        for node in self.nodes:
            for line in text.splitlines():
                fields = line.split("#")[0].split()
                if node.name in fields[1:] and fields[0] != node.addr:
                    raise ClusterError(
                        f"{HOSTS_FILE} already maps {node.name} to {fields[0]}; the test cluster needs "
                        f"{node.addr}: remove that line or run the tests on another machine"
                    )
        missing = [line for line in wanted if line not in text]
        if missing:
            HOSTS_FILE.write_text(text.rstrip("\n") + "\n" + "\n".join(missing) + "\n")
            self._hosts_added = True

    def _remove_hosts(self) -> None:
        if not self._hosts_added:
            return
        # /etc/hosts is often a bind mount: rewrite it in place rather than os.replace it.
        kept = [line for line in HOSTS_FILE.read_text().splitlines() if HOSTS_MARK not in line]
        HOSTS_FILE.write_text("\n".join(kept) + "\n")
        self._hosts_added = False

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script: Path | str, *script_args: str, options: list[str] = (), env=None, cwd=None) -> int:
        """Submit a batch script; return its job id."""
        cmd = ["sbatch", "--parsable", *options, str(script), *script_args]
        done = subprocess.run(cmd, env=env or self.env(), cwd=cwd, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise ClusterError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}\n{self.logs()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (one dict for a plain job or one array task)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return _parse_fields(out.splitlines()[0])

    def array_tasks(self, job_id: int) -> list[dict[str, str]]:
        """One dict per task of a job array (pending tasks may be folded into one record)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return [_parse_fields(line) for line in out.splitlines() if line.strip()]

    def wait_until(self, job_id: int | str, predicate, timeout_s: float, what: str, log_path: Path | None = None) -> dict:
        """Poll a job until ``predicate(fields)``; on timeout raise with the job, its log and daemon logs."""
        deadline = time.monotonic() + timeout_s
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if predicate(fields):
                return fields
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        job_log = _tail(log_path, 80) if log_path else ""
        raise ClusterError(
            f"job {job_id}: timed out after {timeout_s:.0f} s waiting for {what}; last state "
            f"{fields.get('JobState')} Reason={fields.get('Reason')}\n{job_log}\n{self.logs()}"
        )

    def wait_for_end(self, job_id: int | str, timeout_s: float, log_path: Path | None = None) -> dict:
        """Wait until a job (not requeued, not pending) reaches a terminal state."""
        return self.wait_until(
            job_id, lambda f: f.get("JobState") in TERMINAL_STATES, timeout_s, "the job to end", log_path
        )

    def wait_for_array(self, job_id: int, timeout_s: float, log_dir: Path | None = None) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        tasks: list[dict] = []
        while time.monotonic() < deadline:
            tasks = self.array_tasks(job_id)
            if tasks and all(t.get("JobState") in TERMINAL_STATES for t in tasks):
                return tasks
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        logs = ""
        if log_dir is not None:
            logs = "\n".join(_tail(p, 40) for p in sorted(Path(log_dir).glob(f"*{job_id}_*")))
        states = [(t.get("JobId"), t.get("ArrayTaskId"), t.get("JobState")) for t in tasks]
        raise ClusterError(f"array {job_id}: timed out after {timeout_s:.0f} s; tasks {states}\n{logs}\n{self.logs()}")


def _parse_fields(line: str) -> dict[str, str]:
    """``Key=Value Key=Value`` (one-line scontrol output) to a dict; values have no spaces here."""
    fields = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields
