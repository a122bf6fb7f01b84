"""Fetch one package from Debian's unstable suite without touching the machine's apt setup.

The archive address is read from the machine's own apt sources (the first ``deb`` entry
whose suite is a plain release name), so nothing here names a host. apt runs with a
private source list, list directory and cache under ``cache_dir``; the system's
``/etc/apt`` and ``/var/lib/apt`` are left exactly as they were.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile
from pathlib import Path

SUITE = "sid"


class DebianFetchError(RuntimeError):
    """A package could not be fetched from the unstable suite."""


def archive_source() -> tuple[str, str]:
    """(URI, Signed-By keyring) of the machine's main Debian archive."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in Path(path).read_text().split("\n\n"):
            fields = {
                k.strip(): v.strip()
                for k, _, v in (line.partition(":") for line in stanza.splitlines())
                if not k.startswith("#") and v
            }
            uri = fields.get("URIs", "").split()
            suites = fields.get("Suites", "").split()
            if uri and suites and "-" not in suites[0] and fields.get("Types") == "deb":
                return uri[0], fields.get("Signed-By", "")
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            m = re.match(r"deb\s+(?:\[(?P<opts>[^]]*)\]\s+)?(?P<uri>\S+)\s+(?P<suite>[a-z]+)\s", line)
            if m:
                keyring = re.search(r"signed-by=(\S+)", m.group("opts") or "")
                return m.group("uri"), keyring.group(1) if keyring else ""
    raise DebianFetchError("no Debian archive found in the machine's apt sources")


def _apt_options(cache_dir: Path) -> list[str]:
    uri, keyring = archive_source()
    lists = cache_dir / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache_dir / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = cache_dir / "sources.list"
    signed = f"[signed-by={keyring}] " if keyring else ""
    sources.write_text(f"deb {signed}{uri} {SUITE} main\n")
    return [
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={lists}",
        "-o", f"Dir::Cache={cache_dir}",
        "-o", f"Dir::Cache::Archives={cache_dir / 'archives'}",
        "-o", "APT::Get::List-Cleanup=0",
        "-q",
    ]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DebianFetchError(
            f"{' '.join(cmd[:2])} … failed ({proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def update(cache_dir: Path) -> None:
    """Refresh the private package list of the unstable suite."""
    _run(["apt-get", *_apt_options(cache_dir), "update"])


def candidate_version(cache_dir: Path, package: str) -> str:
    out = _run(["apt-cache", *_apt_options(cache_dir), "policy", package])
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise DebianFetchError(f"package {package!r} is not in Debian {SUITE}")
    return m.group(1)


def download(cache_dir: Path, package: str, refresh: bool = True) -> Path:
    """Download ``package``'s .deb into ``cache_dir/debs`` and return its path.

    A .deb already there for the candidate version is reused.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    if refresh or not (cache_dir / "lists").exists():
        update(cache_dir)
    version = candidate_version(cache_dir, package)
    debs = cache_dir / "debs"
    debs.mkdir(exist_ok=True)
    quoted = version.replace(":", "%3a")
    existing = sorted(debs.glob(f"{package}_{quoted}_*.deb"))
    if existing:
        return existing[0]
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        _run(["apt-get", *_apt_options(cache_dir), "download", f"{package}={version}"], cwd=Path(tmp))
        got = sorted(Path(tmp).glob("*.deb"))
        if not got:
            raise DebianFetchError(f"apt-get download {package} produced no .deb")
        final = debs / got[0].name
        os.replace(got[0], final)
    return final


def extract(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files (``dpkg -x``) into ``dest``; idempotent."""
    marker = dest / ".extracted"
    if not marker.exists():
        dest.mkdir(parents=True, exist_ok=True)
        _run(["dpkg-deb", "-x", str(deb), str(dest)])
        marker.write_text(deb.name + "\n")
    return dest
