"""Nets -> one bmodel: the `tpuc-opt` pass pipeline per net, run in parallel, then `model_tool --combine`.

The pipeline is what TPU-MLIR's `model_deploy.py` runs for the seed's LLM flow (read from its
utils/mlir_shell.py; the LLM flow skips the top-level optimisation and lowers the emitted module):

    1. lowering   --processor-assign (chip, mode, cores, addr_mode, high_precision) --processor-top-optimize
                  --convert-top-to-tpu (weights converted to the mode, 4-bit group size) --canonicalize --weight-fold
    2. tpu passes --strip-io-quant (inputs/outputs in the half type where the seed quantises them)
                  --processor-tpu-optimize ... --layer-group ... --address-assign
    3. codegen    --codegen -> <net>.bmodel

Each net is compiled in its own folder of a temporary work folder, with its log there; a failing net
stops the others, its log's tail is printed, and the logs are kept (the large files are removed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace

import numpy as np

from ..backends.base import available_cores
from ..errors import UserError
from .mlir import Net
from .toolchain import Toolchain

LOG_TAIL = 25
MAX_CORES = {"bm1684x": 1, "bm1688": 2}  # TPU cores per chip (TPU-MLIR's get_tpu_info().max_core_num)
# lanes per core; the dynamic flow's small mask is 4 x this (LlmConverter.MASK_SIZE)
NPU_NUM = {"bm1684x": 64, "bm1688": 32}
DEFAULT_JOBS: int | None = None  # tpuc-opt processes at once; None: the cores this process may use


def steps(net: Net, chip: str, num_core: int) -> list[tuple[str, list[str]]]:
    """The three tpuc-opt runs of one net, run in its folder (`<name>.mlir` in, `<name>.bmodel` out)."""
    n = net.name
    lowering = [
        "tpuc-opt",
        f"{n}.mlir",
        f"--processor-assign=chip={chip} mode={net.mode} num_device=1 num_core={num_core} "
        f"addr_mode={net.addr_mode} high_precision=True",
        "--processor-top-optimize",
        f"--convert-top-to-tpu=weightFileName={n}_tpu_weights.npz asymmetric=False doWinograd=False "
        f"q_group_size={net.q_group_size} q_symmetric=False matmul_perchannel=False gelu_mode=normal",
        "--canonicalize",
        "--weight-fold",
        "-o",
        f"{n}_tpu.mlir",
    ]
    optimize = [
        "tpuc-opt",
        f"{n}_tpu.mlir",
        "--mlir-disable-threading",
        f"--strip-io-quant=quant_input={net.quant_input} quant_output={net.quant_output} quant_input_list= "
        "quant_output_list= quant_output_bf16=False quant_input_int8=False quant_output_int8=False",
        "--processor-tpu-optimize",
        "--dev-parallel",
        "--weight-reorder",
        f"--subnet-divide=dynamic={net.dynamic}",
        "--op-reorder",
        "--topo-sort",
        "--layer-group=opt=2 group_by_cores=auto compress_mode=none debugger=0 disable_group_overlap=false "
        "lgcache=true config_filename= enable_lghash=false lghash_dir=",
        "--core-parallel",
        "--after-layergroup-weight-reorder",
        "--address-assign",
        "-o",
        f"{n}_final.mlir",
    ]
    codegen = [
        "tpuc-opt",
        f"{n}_final.mlir",
        f"--codegen=model_file={n}.bmodel embed_debug_info=False model_version=latest bmodel_only=False "
        "gdma_check=False rvti=False",
        "-o",
        os.devnull,
    ]
    return [("lowering", lowering), ("tpu passes", optimize), ("codegen", codegen)]


class Compiler:
    """Compiles nets as they are handed in (emission overlaps compilation), `jobs` at a time."""

    def __init__(self, tc: Toolchain, chip: str, work: str, progress, total: int = 0, jobs: int | None = None):
        self.tc, self.chip, self.work, self.progress, self.total = tc, chip, work, progress, total
        self.num_core = MAX_CORES[chip]
        self.pool = ThreadPoolExecutor(max_workers=jobs or DEFAULT_JOBS or available_cores())
        self.futures = {}
        self.order: list[str] = []
        self.done = 0
        self.lock = threading.Lock()

    def write_weights(self, file_name: str, weights: dict[str, np.ndarray]) -> str:
        path = os.path.join(self.work, file_name)
        with open(path, "wb") as f:
            np.savez(f, **weights)
        return path

    def submit(self, net: Net) -> None:
        """Write the net's MLIR into its folder and queue its compilation."""
        self._raise_failures()
        folder = os.path.join(self.work, net.name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{net.name}.mlir"), "w", encoding="utf-8") as f:
            f.write(net.module.text())
        self.order.append(net.name)
        light = replace(net, module=None)  # the text is on disk; do not keep the weights alive
        self.futures[self.pool.submit(self._compile, light, folder)] = net.name

    def _compile(self, net: Net, folder: str) -> str:
        log_path = os.path.join(folder, f"{net.name}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            for step, cmd in steps(net, self.chip, self.num_core):
                log.write(f"$ {' '.join(cmd)}\n")
                log.flush()
                rc = self.tc.run(cmd, cwd=folder, log=log)
                if rc != 0:
                    raise CompileError(net.name, step, rc, log_path)
        for name in os.listdir(folder):  # keep the bmodel and the log; the rest is large
            if name.endswith((".npz", ".mlir")):
                os.remove(os.path.join(folder, name))
        with self.lock:
            self.done += 1
            self.progress.update(self.done, max(self.total, len(self.order)), net.name)
        return os.path.join(folder, f"{net.name}.bmodel")

    def _raise_failures(self) -> None:
        for fut in [f for f in self.futures if f.done()]:
            exc = fut.exception()
            if exc is not None:
                self._fail(exc)

    def _fail(self, exc: BaseException):
        self.pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(exc, CompileError):
            tail = _tail(exc.log, LOG_TAIL)
            self.progress.stream.write(f"--- last lines of {exc.log} ---\n{tail}\n---\n")
            raise UserError(
                f"TPU-MLIR failed to compile net {exc.net} ({exc.step} step, exit {exc.rc}); its log is {exc.log}"
            ) from None
        raise exc

    def finish(self) -> list[str]:
        """Wait for every net; the bmodels in submission order."""
        pending = set(self.futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.exception() is not None:
                    self._fail(fut.exception())
        self.pool.shutdown()
        return [os.path.join(self.work, n, f"{n}.bmodel") for n in self.order]


class CompileError(Exception):
    def __init__(self, net: str, step: str, rc: int, log: str):
        super().__init__(f"{net}: {step} failed ({rc})")
        self.net, self.step, self.rc, self.log = net, step, rc, log


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def combine(tc: Toolchain, bmodels: list[str], out: str, work: str) -> None:
    """`model_tool --combine` the per-net bmodels into one (identical coefficients are stored once)."""
    log_path = os.path.join(work, "combine.log")
    with open(log_path, "w", encoding="utf-8") as log:
        rc = tc.run(["model_tool", "--combine", *bmodels, "-o", out], cwd=work, log=log)
    if rc != 0 or not os.path.isfile(out):
        raise UserError(f"model_tool --combine failed (exit {rc}): {_tail(log_path, 1)}")


def info(tc: Toolchain, bmodel: str) -> str:
    rc, out = tc.output(["model_tool", "--info", bmodel], timeout=600)
    if rc != 0:
        raise UserError(f"model_tool --info {bmodel} failed: {out.strip().splitlines()[-1] if out.strip() else rc}")
    return out


def work_dir(out_dir: str) -> str:
    """A temporary folder for MLIR, weights, per-net bmodels and logs, beside the bundle."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tpu-mlir-", dir=parent)


def clean_work(work: str, keep_logs: bool) -> None:
    """Remove the work folder, or (after a failure) all but its logs."""
    if not keep_logs:
        shutil.rmtree(work, ignore_errors=True)
        return
    for dirpath, _, names in os.walk(work):
        for name in names:
            if not name.endswith(".log"):
                try:
                    os.remove(os.path.join(dirpath, name))
                except OSError:
                    pass
