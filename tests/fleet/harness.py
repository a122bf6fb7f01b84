"""A fleet of QEMU guests driven by ansible-core over SSH: the machinery of tests/fleet/test_fleet.py.

Each guest is a served guest (pyvfio_lu.vm.serve) of the project's kernel: an SSH server
forwarded from 127.0.0.1:PORT only, root login with one throwaway key made for the run, and
tests/fleet/vmm.py at every boot (guest RAM in a memfd, preserved and held; taken back and
finished after each live update). The controller is this machine's ansible-core, with the
collection in ansible_collections/ and an inventory, ansible.cfg and known_hosts written per run.

    python tests/fleet/harness.py [--hosts 3] [--flavour upstream]   # boot, roll out once, power off
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VMM = "tests/fleet/vmm.py"
PLAYBOOK = ROOT / "ansible_collections/pyvfio_lu/live_update/playbooks/rolling_live_update.yml"


def ansible_playbook() -> str:
    """ansible-playbook of this interpreter's environment (the project's .venv with the fleet extra)."""
    path = Path(sys.executable).parent / "ansible-playbook"
    if not path.exists():
        raise RuntimeError(f"no {path}: install the fleet extra (pip install -e '.[fleet]'; bash scripts/setup does)")
    return str(path)


class Fleet:
    """``hosts`` served guests under ``results``; :meth:`rollout` runs the example playbook."""

    def __init__(self, results: Path, hosts: list[str], *, kernel: Path, memory: str = "1G",
                 echo: bool = False, timeout: float = 3600.0) -> None:
        from pyvfio_lu.vm.serve import GuestServer, SshKeys

        self.results = results
        self.hosts = hosts
        self.kernel = kernel
        self.echo = echo
        results.mkdir(parents=True, exist_ok=True)
        self.client = SshKeys.create(results / "controller-ssh")  # the one key that logs in anywhere
        self._lock = threading.Lock()
        self.guests = {
            h: GuestServer(f"{shlex.quote(sys.executable)} {VMM} --name vm-{h.rsplit('-', 1)[-1]} --state /shared",
                           name=h, results_dir=results / h, kernel=kernel, memory=memory, cwd=ROOT,
                           # under TCG on a busy host the kernel's boot-time check of the timer IRQ
                           # can miss its window, and with interrupt remapping that is a panic
                           # ("timer doesn't work through Interrupt-remapped IO-APIC"); seen once in
                           # a kexec'd fleet guest. The check proves nothing about live update.
                           extra_append="no_timer_check",
                           client_key=self.client.client_key, timeout=timeout, on_line=self._echo)
            for h in hosts
        }
        # short: ssh's control sockets live here (a Unix socket path has 108 bytes at most)
        self.control_dir = Path(tempfile.mkdtemp(prefix="pvl-cp-"))
        self.timeline: list[tuple[float, str]] = []

    def _echo(self, name: str, t: float, text: str) -> None:
        if self.echo and ("pyvfio-lu:" in text or "vmm |" in text or "Linux version" in text):
            with self._lock:
                print(f"[{name} {t:7.2f}] {text}", flush=True)

    def session(self, host: str) -> str:
        return f"vm-{host.rsplit('-', 1)[-1]}"

    # --- guests -------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> dict[str, float]:
        """Boot every guest (in parallel) and wait until each serves SSH; host seconds each took."""
        t0 = time.monotonic()
        for g in self.guests.values():
            g.start()
        took = {}
        for h, g in self.guests.items():
            g.wait_serving(1, timeout=timeout)
            took[h] = round(time.monotonic() - t0, 2)
        self._write_config()
        return took

    def stop(self) -> dict[str, object]:
        out = {}
        for h, g in self.guests.items():
            out[h] = g.stop()
        import shutil

        shutil.rmtree(self.control_dir, ignore_errors=True)
        return out

    def _write_config(self) -> None:
        kh = self.results / "known_hosts"
        kh.write_text("".join(g.keys.known_hosts_line(g.port) + "\n" for g in self.guests.values()))
        ssh_args = " ".join([
            "-F /dev/null", f"-o UserKnownHostsFile={kh}", "-o StrictHostKeyChecking=yes", "-o IdentitiesOnly=yes",
            "-o ServerAliveInterval=2", "-o ServerAliveCountMax=3", "-o ConnectTimeout=10",
        ])
        hosts = {h: {"ansible_port": g.port, "live_update_sessions": [self.session(h)]}
                 for h, g in self.guests.items()}
        first = next(iter(self.guests.values()))
        inventory = {"all": {"children": {"hypervisors": {"hosts": hosts}}, "vars": {
            "ansible_host": "127.0.0.1", "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.client.client_key),
            "ansible_ssh_common_args": ssh_args,
            "ansible_python_interpreter": sys.executable,  # the project's venv, seen through 9p
            "live_update_kernel": str(self.kernel), "live_update_initrd": str(first.initrd),
        }}}
        (self.results / "inventory.json").write_text(json.dumps(inventory, indent=1) + "\n")
        (self.results / "ansible.cfg").write_text(f"""[defaults]
collections_path = {ROOT}
inventory = {self.results / 'inventory.json'}
retry_files_enabled = False
forks = 5
timeout = 30
interpreter_python = {sys.executable}
local_tmp = {self.results / 'ansible-tmp'}

[ssh_connection]
pipelining = True
control_path_dir = {self.control_dir}
""")

    def env(self) -> dict[str, str]:
        env = dict(os.environ, ANSIBLE_CONFIG=str(self.results / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0",
                   ANSIBLE_NOCOLOR="1", ANSIBLE_HOME=str(self.results / "ansible-home"),
                   PYTHONWARNINGS="ignore::DeprecationWarning")
        env.pop("PYVFIO_LU_GUEST_STAGE", None)
        return env

    # --- ansible --------------------------------------------------------------------------------
    def rollout(self, name: str, extra_vars: dict | None = None, host_vars: dict[str, dict] | None = None,
                hosts: list[str] | None = None, timeout: float = 1800.0) -> dict:
        """Run the example playbook as rollout ``name`` over ``hosts`` (default all, in order);
        returns rc, wall time, output and each host's recorded result (``None`` for a host the
        rollout never reached)."""
        report_dir = self.results / name
        report_dir.mkdir(exist_ok=True)
        hosts = hosts or self.hosts
        extra = {"live_update_report_dir": str(report_dir), "live_update_hosts": ",".join(hosts),
                 **(extra_vars or {})}
        argv = [ansible_playbook(), str(PLAYBOOK), "-e", json.dumps(extra)]
        if host_vars:
            hv = self.results / f"{name}-host-vars.json"
            inv = json.loads((self.results / "inventory.json").read_text())
            for h, vs in host_vars.items():
                inv["all"]["children"]["hypervisors"]["hosts"][h].update(vs)
            hv.write_text(json.dumps(inv, indent=1) + "\n")
            argv += ["-i", str(hv)]
        t0 = time.monotonic()
        log = self.results / f"{name}.log"
        with open(log, "w") as fh:
            fh.write(f"$ {shlex.join(argv)}\n")
            fh.flush()
            proc = subprocess.run(argv, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)
            fh.write(proc.stdout)
        seconds = round(time.monotonic() - t0, 2)
        if self.echo:
            print(proc.stdout, flush=True)
        reports = {}
        for h in hosts:
            path = report_dir / f"{h}.json"
            reports[h] = json.loads(path.read_text()) if path.exists() else None
        return {"rc": proc.returncode, "seconds": seconds, "output": proc.stdout, "reports": reports, "log": str(log)}

    def facts(self) -> dict[str, dict]:
        """Every host's pyvfio_lu facts, ad hoc (ansible -m pyvfio_lu.live_update.facts)."""
        argv = [str(Path(ansible_playbook()).with_name("ansible")), "hypervisors", "-m", "pyvfio_lu.live_update.facts",
                "-o"]
        proc = subprocess.run(argv, cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=600)
        out = {}
        for line in proc.stdout.splitlines():
            host, sep, rest = line.partition(" | ")
            if sep and "=>" in rest:
                try:
                    out[host.strip()] = json.loads(rest.split("=>", 1)[1])["ansible_facts"]["pyvfio_lu"]
                except (ValueError, KeyError):
                    continue
        return out

    def control(self, host: str, command: str, timeout: float = 120.0) -> dict:
        """Tell the host's background VMM (tests/fleet/vmm.py) ``command`` and wait for its answer."""
        self._commands = getattr(self, "_commands", 0) + 1
        line = f"{self._commands} {command}"
        path = self.results / host / "vmm-control"
        path.write_text(line + "\n")
        done = self.results / host / "vmm-control.done"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                answer = json.loads(done.read_text())
                if answer.get("command") == line:
                    return answer
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{host}: the VMM did not answer {line!r} within {timeout:.0f} s")

    def vmm_report(self, host: str, stage: int) -> dict | None:
        path = self.results / host / f"vmm-stage-{stage}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def expected_sha256(self, host: str) -> str | None:
        path = self.results / host / "expected.json"
        return json.loads(path.read_text())["sha256"] if path.exists() else None


def main() -> int:
    import argparse

    from pyvfio_lu.vm.kernel import find_cached

    parser = argparse.ArgumentParser(description="Boot a fleet of guests and roll one live update through it.")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--flavour", default="upstream")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "fleet" / time.strftime("%Y%m%d-%H%M%S-manual"))
    args = parser.parse_args()
    image = find_cached(args.flavour)
    if image is None:
        print(f"no cached {args.flavour} kernel: python -m pyvfio_lu.vm.kernel --flavour {args.flavour}")
        return 2
    fleet = Fleet(args.results, [f"fleet-{chr(ord('a') + i)}" for i in range(args.hosts)], kernel=image.bzimage,
                  echo=True)
    try:
        print("serving after", fleet.start())
        r = fleet.rollout("rollout-1", {"live_update_cmdline_set": {"pyvfio_lu.stage": "2"}})
        print("rc", r["rc"], "seconds", r["seconds"])
        for h, rep in r["reports"].items():
            print(h, rep and rep.get("timings"), rep and rep.get("msg"))
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
