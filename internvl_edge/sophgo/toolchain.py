"""TPU-MLIR, the compiler and chip simulator of the Sophgo target: fetched, prepared and found.

We use its native tools only (`tpuc-opt`, `model_tool`) and its runtime libraries (`libbmrt`, `libbmlib`,
`libcmodel_<chip>`): its Python front end is built for CPython 3.10 alone. The pinned PyPI wheel is
fetched with pip (`pip download`, which accepts a wheel for another Python version; installing it
would not), unpacked into the user's cache folder and prepared there:

- the wheel ships Ubuntu 22.04's glibc 2.35 (`lib/third_party/libc.so.6`, `libm.so.6`, `libpthread.so.0`)
  and its binaries find it through RUNPATH next to the system's loader: on a newer distribution
  `tpuc-opt` segfaults and `model_tool` aborts. Those three files are moved aside (kept, not deleted),
  so the system's glibc is used, as on the wheel's own platform;
- the environment of every tool run names `TPUC_ROOT` (codegen needs it), the library folders and the
  PPL kernel paths, as the wheel's `tpu_mlir/__init__.py` sets them for its own entry points.

A user who already has TPU-MLIR (Sophgo's docker image, a source build) points to its `tpu_mlir`
folder with `--tpu-mlir PATH` or `TPUC_ROOT`; such a folder is used as it is, never modified.
https://pypi.org/project/tpu-mlir/1.30.2/
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

from ..bundle import user_cache_dir
from ..errors import UserError
from . import CHIPS

VERSION = "1.30.2"
REQUIREMENT = f"tpu-mlir=={VERSION}"
WHEEL = f"tpu_mlir-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "542807361c9eeb0777a7bd35e501d8c71cce767e4bce021a3cb3a7c25c35f909"
INSTALL_COMMAND = "internvl-edge toolchain install"
BUNDLED_GLIBC = ("libc.so.6", "libm.so.6", "libpthread.so.0")  # in lib/third_party
SKIPPED_PREFIXES = ("tpu_mlir/python/",)  # the cp310 front end: unusable here, 178 MB
MARKER = "installed.json"
SIMULATOR = {chip: f"libcmodel_{chip}.so" for chip in CHIPS}


def install_dir() -> str:
    return os.path.join(user_cache_dir(), f"tpu-mlir-{VERSION}")


@dataclass
class Toolchain:
    root: str  # the `tpu_mlir` folder: bin/, lib/ (what TPUC_ROOT names)
    origin: str  # "cache" (installed by us), "TPUC_ROOT" or "option"
    work: str  # writable: PPL build cache, per-chip simulator folders

    def tool(self, name: str) -> str:
        return os.path.join(self.root, "bin", name)

    @property
    def lib(self) -> str:
        return os.path.join(self.root, "lib")

    def env(self) -> dict:
        """The environment for tool runs (the wheel's __init__.py sets the same variables)."""
        env = dict(os.environ)
        ppl = os.path.join(self.root, "cross_toolchains", "ppl_compile")
        libs = [self.lib, os.path.join(self.lib, "capi"), os.path.join(self.lib, "third_party")]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env.update(
            {
                "TPUC_ROOT": self.root,
                "LD_LIBRARY_PATH": os.pathsep.join(libs),
                "PATH": os.pathsep.join(
                    [os.path.join(self.root, "bin"), os.path.join(ppl, "bin"), env.get("PATH", "")]
                ),
                "PPL_PROJECT_ROOT": ppl,
                "PPL_RUNTIME_PATH": os.path.join(ppl, "deps"),
                "PPL_BUILD_PATH": os.path.join(self.work, "ppl"),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),  # we run several tools side by side
            }
        )
        return env

    def run(self, args: list[str], cwd: str | None = None, log=None, timeout: float | None = None) -> int:
        """Run a tool with the toolchain's environment; its output goes to `log` (a file object)."""
        exe = args[0] if os.sep in args[0] else self.tool(args[0])
        try:
            proc = subprocess.run(
                [exe, *args[1:]],
                cwd=cwd,
                env=self.env(),
                stdout=log or subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except OSError as e:
            raise UserError(f"cannot run {exe}: {e.strerror}; reinstall with `{INSTALL_COMMAND}`") from None
        return proc.returncode

    def output(self, args: list[str], timeout: float = 120) -> tuple[int, str]:
        with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
            try:
                rc = self.run(args, log=log, timeout=timeout)
            except subprocess.TimeoutExpired:
                return -1, "timed out"
            log.seek(0)
            return rc, log.read()

    def simulator_dir(self, chip: str) -> str:
        """A folder whose `libbmrt.so` runs the chip's simulator.

        libbmlib dlopen()s "libcmodel.so", found through its RUNPATH ($ORIGIN): a folder of links to the
        toolchain's libraries in which libcmodel.so is the chip's gives each chip its own simulator
        without touching the shared `lib/libcmodel.so` (which TPU-MLIR's own runner re-links)."""
        if chip not in SIMULATOR:
            raise UserError(f"no simulator for chip {chip}; available: {', '.join(SIMULATOR)}")
        sim = os.path.join(self.work, "sim")
        folder = os.path.join(sim, chip)
        if os.path.isfile(os.path.join(folder, ".complete")):
            return folder
        source = os.path.join(self.lib, SIMULATOR[chip])
        if not os.path.isfile(source):
            raise UserError(f"TPU-MLIR at {self.root} has no {SIMULATOR[chip]}; it cannot simulate {chip}")
        os.makedirs(sim, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{chip}-", dir=sim)
        for name in os.listdir(self.lib):
            if os.path.isfile(os.path.join(self.lib, name)) and name != "libcmodel.so":
                os.symlink(os.path.join(self.lib, name), os.path.join(tmp, name))
        os.symlink(source, os.path.join(tmp, "libcmodel.so"))
        open(os.path.join(tmp, ".complete"), "w").close()
        lib_link = os.path.join(sim, "lib")  # $ORIGIN/../lib/third_party, the libraries' second RUNPATH entry
        if not os.path.islink(lib_link):
            os.symlink(self.lib, lib_link)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def describe(self) -> dict:
        return {"root": self.root, "origin": self.origin, "version": tool_version(self), "work": self.work}


def _work_dir_for(root: str) -> str:
    digest = hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:12]
    return os.path.join(user_cache_dir(), "tpu-mlir-work", digest)


def _from_path(path: str, origin: str) -> Toolchain:
    root = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(root, "tpu_mlir", "bin")):  # the folder above tpu_mlir
        root = os.path.join(root, "tpu_mlir")
    if not os.path.isfile(os.path.join(root, "bin", "tpuc-opt")):
        raise UserError(
            f"{origin} {path} is not a TPU-MLIR folder (no bin/tpuc-opt); point it at the `tpu_mlir` folder"
        )
    return Toolchain(root=root, origin=origin, work=_work_dir_for(root))


def locate(path: str | None = None) -> Toolchain | None:
    """The toolchain to use: an explicit path, then TPUC_ROOT, then our installed copy."""
    if path:
        return _from_path(path, "option")
    if os.environ.get("TPUC_ROOT"):
        return _from_path(os.environ["TPUC_ROOT"], "TPUC_ROOT")
    inst = install_dir()
    if os.path.isfile(os.path.join(inst, MARKER)):
        return Toolchain(root=os.path.join(inst, "tpu_mlir"), origin="cache", work=os.path.join(inst, "work"))
    return None


def require(path: str | None = None) -> Toolchain:
    tc = locate(path)
    if tc is None:
        raise UserError(
            f"TPU-MLIR {VERSION} is not installed; run `{INSTALL_COMMAND}` (or set TPUC_ROOT to an existing one)"
        )
    return tc


def tool_version(tc: Toolchain) -> str:
    rc, out = tc.output(["model_tool", "--version"], timeout=60)
    lines = out.strip().splitlines()
    return lines[-1].strip() if rc == 0 and lines else "unknown"


def check(tc: Toolchain) -> list[str]:
    """What keeps this toolchain from working here (empty when it works)."""
    problems = []
    for tool, args in (("tpuc-opt", ["--version"]), ("model_tool", ["--version"])):
        if not os.path.isfile(tc.tool(tool)):
            problems.append(f"{tool} is missing")
            continue
        rc, out = tc.output([tool, *args], timeout=60)
        if rc != 0:
            glibc = [n for n in BUNDLED_GLIBC if os.path.exists(os.path.join(tc.lib, "third_party", n))]
            why = (
                f" (its bundled {', '.join(glibc)} in lib/third_party clash with this system's glibc)" if glibc else ""
            )
            problems.append(f"{tool} fails (exit {rc}){why}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    for name in ("libbmrt.so", "libbmlib.so", *SIMULATOR.values()):
        if not os.path.isfile(os.path.join(tc.lib, name)):
            problems.append(f"lib/{name} is missing")
    return problems


def require_working(path: str | None = None) -> Toolchain:
    tc = require(path)
    problems = check(tc)
    if problems:
        fix = f"run `{INSTALL_COMMAND}`" if tc.origin == "cache" else f"unset TPUC_ROOT and run `{INSTALL_COMMAND}`"
        raise UserError(f"TPU-MLIR at {tc.root} does not work here: {problems[0]}; {fix}")
    return tc


# -- installing ---------------------------------------------------------------------------------------
def _download(dest: str, progress) -> str:
    progress.step(f"downloading {REQUIREMENT} with pip (about 312 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.10", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", REQUIREMENT, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = os.path.join(dest, WHEEL)
    if proc.returncode != 0 or not os.path.isfile(wheel):
        err = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
        raise UserError(
            f"pip could not download {REQUIREMENT} ({err[-1].strip() if err else 'no output'}); "
            "check the network or pip's index settings, or set TPUC_ROOT to an existing TPU-MLIR"
        )
    progress.done()
    return wheel


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unpack(wheel: str, dest: str, progress) -> None:
    """Extract with the archive's Unix modes (zipfile drops them), leaving out the Python front end."""
    with zipfile.ZipFile(wheel) as z:
        members = [
            m
            for m in z.infolist()
            if m.filename.startswith("tpu_mlir/") and not m.filename.startswith(SKIPPED_PREFIXES)
        ]
        progress.step("unpacking")
        for n, m in enumerate(members):
            path = z.extract(m, dest)
            mode = (m.external_attr >> 16) & 0o777
            if mode and not m.is_dir():
                os.chmod(path, mode)
            if n % 50 == 0 or n + 1 == len(members):
                progress.update(n + 1, len(members))
        progress.done()


def install(progress, force: bool = False, wheel: str | None = None) -> Toolchain:
    """Fetch, unpack and prepare the pinned wheel into the cache (written beside it, renamed at the end)."""
    final = install_dir()
    if os.path.isfile(os.path.join(final, MARKER)) and not force:
        tc = locate_installed()
        if not check(tc):
            return tc
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tpu-mlir-{VERSION}.partial-", dir=parent)
    try:
        if wheel is None:
            wheel = _download(tmp, progress)
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise UserError(
                f"{os.path.basename(wheel)} has SHA-256 {digest[:16]}..., not the pinned {WHEEL_SHA256[:16]}..."
            )
        _unpack(wheel, tmp, progress)
        if os.path.dirname(os.path.abspath(wheel)) == tmp:
            os.remove(wheel)
        moved = os.path.join(tmp, "glibc-bundled")
        os.makedirs(moved)
        for name in BUNDLED_GLIBC:
            src = os.path.join(tmp, "tpu_mlir", "lib", "third_party", name)
            if os.path.exists(src):
                os.rename(src, os.path.join(moved, name))
        os.makedirs(os.path.join(tmp, "work", "ppl"))
        tc = Toolchain(root=os.path.join(tmp, "tpu_mlir"), origin="cache", work=os.path.join(tmp, "work"))
        progress.step("checking tpuc-opt and model_tool")
        problems = check(tc)
        if problems:
            raise UserError(f"the unpacked TPU-MLIR does not run here: {problems[0]}")
        progress.done()
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "requirement": REQUIREMENT,
                    "wheel_sha256": digest,
                    "moved_aside": list(BUNDLED_GLIBC),
                    "skipped": list(SKIPPED_PREFIXES),
                    "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                f,
                indent=2,
            )
        if os.path.exists(final):
            old = tmp + ".old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, final)
            except OSError:  # another process installed it meanwhile: keep theirs
                if not os.path.isfile(os.path.join(final, MARKER)):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return locate_installed()


def locate_installed() -> Toolchain:
    inst = install_dir()
    return Toolchain(root=os.path.join(inst, "tpu_mlir"), origin="cache", work=os.path.join(inst, "work"))
