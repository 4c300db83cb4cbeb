"""Fetch one released source distribution from PyPI's simple index, check its sha256, unpack it.

For stacks whose sdist cannot be installed here (vllm-ascend needs Ascend's toolchain to build,
and ``pip download`` builds metadata first): the conformance tests load single pure-Python
modules of the release straight from the unpacked source. Run by tests/stacks/stacks.mk:

    python tests/stacks/fetch_sdist.py vllm-ascend 0.23.0.post1 SHA256 DEST_DIR
"""

from __future__ import annotations

import hashlib
import re
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

INDEX = "https://pypi.org/simple/{name}/"


def main(name: str, version: str, sha256: str, dest: str) -> None:
    html = urllib.request.urlopen(INDEX.format(name=name), timeout=120).read().decode()
    stem = name.replace("-", "_")
    links = [u for u in re.findall(r'href="([^"]+)"', html) if f"/{stem}-{version}.tar.gz" in u]
    if not links:
        sys.exit(f"{name} {version}: no sdist on the index")
    url = links[0].split("#")[0]
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"{stem}-{version}.tar.gz"
        urllib.request.urlretrieve(url, archive)
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != sha256:
            sys.exit(f"{archive.name}: sha256 {digest}, expected {sha256}")
        Path(dest).mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    print(f"{name} {version} unpacked into {dest}")


if __name__ == "__main__":
    main(*sys.argv[1:])
