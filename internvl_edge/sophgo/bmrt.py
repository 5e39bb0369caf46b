"""Sophgo's runtime (libbmrt + libbmlib) through ctypes: a loaded bmodel, device memory, net launches.

The C layouts are libsophon's (bmruntime_interface.h, bmdef.h, bmlib_runtime.h); TPU-MLIR's wheel ships
the same libraries built against its chip simulators, without headers.
https://github.com/sophgo/libsophon (bmlib/include/bmlib_runtime.h, bmruntime/include/bmdef.h)

Which libraries run: libsophon's install when a Sophgo device is present (a board or a PCIe card),
otherwise the toolchain's CPU simulator (cmodel) of the bundle's chip. One process holds one of them:
libbmlib binds its simulator when first loaded.
"""

from __future__ import annotations

import atexit
import ctypes as C
import functools
import glob
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..checkpoint.safetensors import bf16_bits
from ..errors import UserError

LIBSOPHON_DIRS = ("/opt/sophon/libsophon-current/lib",)
DEVICE_NODES = ("/dev/bm-sophon*", "/dev/bmdev-ctl", "/dev/bm-tpu*")  # PCIe card, PCIe control, SoC board
MAX_DIMS = 8


class Shape(C.Structure):
    _fields_ = [("num_dims", C.c_int), ("dims", C.c_int * MAX_DIMS)]

    @classmethod
    def of(cls, shape) -> Shape:
        s = cls()
        s.num_dims = len(shape)
        for i, d in enumerate(shape):
            s.dims[i] = int(d)
        return s

    def tuple(self) -> tuple[int, ...]:
        return tuple(self.dims[i] for i in range(self.num_dims))


class DeviceMem(C.Structure):  # bm_mem_desc_t: 64-bit device address, then flags and a 32-bit size
    _fields_ = [
        ("device_addr", C.c_uint64),
        ("reserved", C.c_uint32),
        ("dmabuf_fd", C.c_int32),
        ("flags", C.c_uint32),
        ("size", C.c_uint32),
    ]


class Tensor(C.Structure):
    _fields_ = [("dtype", C.c_int), ("shape", Shape), ("device_mem", DeviceMem), ("st_mode", C.c_int)]


class StageInfo(C.Structure):  # only the leading fields, the same in every libsophon version
    _fields_ = [("input_shapes", C.POINTER(Shape)), ("output_shapes", C.POINTER(Shape))]


class NetInfo(C.Structure):
    _fields_ = [
        ("name", C.c_char_p),
        ("is_dynamic", C.c_bool),
        ("input_num", C.c_int),
        ("input_names", C.POINTER(C.c_char_p)),
        ("input_dtypes", C.POINTER(C.c_int)),
        ("input_scales", C.POINTER(C.c_float)),
        ("output_num", C.c_int),
        ("output_names", C.POINTER(C.c_char_p)),
        ("output_dtypes", C.POINTER(C.c_int)),
        ("output_scales", C.POINTER(C.c_float)),
        ("stage_num", C.c_int),
        ("stages", C.POINTER(StageInfo)),
        ("max_input_bytes", C.POINTER(C.c_size_t)),
        ("max_output_bytes", C.POINTER(C.c_size_t)),
    ]


# bm_data_type_t -> (name, bytes); bf16 travels as its uint16 bit pattern
DTYPES = {
    0: ("f32", 4),
    1: ("f16", 2),
    2: ("i8", 1),
    3: ("u8", 1),
    4: ("i16", 2),
    5: ("u16", 2),
    6: ("i32", 4),
    7: ("u32", 4),
    8: ("bf16", 2),
}


@dataclass
class TensorInfo:
    name: str
    dtype: str
    dtype_code: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPES[self.dtype_code][1]


@dataclass
class NetIO:
    name: str
    dynamic: bool
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


def to_device_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return np.ascontiguousarray(x, np.float32)
    if dtype == "f16":
        return np.ascontiguousarray(x, np.float16)
    if dtype == "bf16":
        return bf16_bits(x)
    if dtype == "i32":
        return np.ascontiguousarray(x, np.int32)
    raise ValueError(f"unsupported device dtype {dtype}")


def from_device_dtype(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw bytes (uint8) -> float32 (or int32) array."""
    if dtype == "f32":
        return raw.view(np.float32)
    if dtype == "f16":
        return raw.view(np.float16).astype(np.float32)
    if dtype == "bf16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "i32":
        return raw.view(np.int32)
    raise ValueError(f"unsupported device dtype {dtype}")


def device_present() -> bool:
    return any(glob.glob(p) for p in DEVICE_NODES)


@dataclass
class Libraries:
    folder: str  # holds libbmrt.so and libbmlib.so
    description: str  # what `describe()` reports
    simulator: bool


def find_libraries(chip: str, toolchain_path: str | None = None) -> Libraries:
    """libsophon's install when a Sophgo device is present, else the toolchain's simulator of `chip`
    (INTERNVL_EDGE_BMRT_LIB names another folder holding libbmrt.so and libbmlib.so)."""
    explicit = os.environ.get("INTERNVL_EDGE_BMRT_LIB")
    if explicit:
        return Libraries(explicit, f"libbmrt from {explicit}", simulator=not device_present())
    if device_present():
        for d in LIBSOPHON_DIRS:
            if os.path.isfile(os.path.join(d, "libbmrt.so")):
                return Libraries(d, f"libsophon ({d})", simulator=False)
    from . import toolchain

    tc = toolchain.require(toolchain_path)
    return Libraries(tc.simulator_dir(chip), f"TPU-MLIR {toolchain.VERSION} {chip} simulator (cmodel)", simulator=True)


_loaded: dict[str, object] = {}
_lock = threading.RLock()
_quiet_depth = 0  # quiet_c_stdout() calls open in this process (guarded by _lock)


@functools.cache
def _libc():
    return C.CDLL(None)


@contextmanager
def quiet_c_stdout():
    """The simulator prints chatter on every launch with printf: keep it off our stdout (`run --json`
    writes there) and off the terminal; with INTERNVL_EDGE_DEBUG=1 it goes to stderr. Errors that the
    libraries write to stderr stay visible. Re-entrant: a caller may hold it around a whole forward
    call (once per token) and the launches inside then cost no redirection of their own."""
    global _quiet_depth
    with _lock:
        if _quiet_depth:
            _quiet_depth += 1
            try:
                yield
            finally:
                _quiet_depth -= 1
            return
        _quiet_depth = 1
        try:
            with _redirected_stdout():
                yield
        finally:
            _quiet_depth = 0


@contextmanager
def _redirected_stdout():
    libc = _libc()
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    target = os.dup(2) if os.environ.get("INTERNVL_EDGE_DEBUG") else os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(target, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(target)


def _quiet_exit() -> None:
    """libbmlib's exit handlers print "BMLIB Send Quit Message" after Python is done: not on our stdout."""
    try:
        sys.stdout.flush()
        _libc().fflush(None)
        target = os.dup(2) if os.environ.get("INTERNVL_EDGE_DEBUG") else os.open(os.devnull, os.O_WRONLY)
        os.dup2(target, 1)
    except (OSError, ValueError):
        pass


def _load(folder: str):
    """libbmlib and libbmrt from one folder, once per process."""
    with _lock:
        if _loaded and _loaded["folder"] != folder:
            raise UserError(
                f"this process already runs {_loaded['folder']}; a bundle for another chip or "
                "runtime needs a process of its own"
            )
        if not _loaded:
            try:
                bmlib = C.CDLL(os.path.join(folder, "libbmlib.so"), mode=C.RTLD_GLOBAL)
                bmrt = C.CDLL(os.path.join(folder, "libbmrt.so"), mode=C.RTLD_GLOBAL)
            except OSError as e:
                raise UserError(f"cannot load Sophgo's runtime from {folder}: {e}") from None
            _declare(bmlib, bmrt)
            _loaded.update(folder=folder, bmlib=bmlib, bmrt=bmrt)
            atexit.register(_quiet_exit)
        return _loaded["bmlib"], _loaded["bmrt"]


def _declare(bmlib, bmrt) -> None:
    vp, mem = C.c_void_p, DeviceMem
    for name, res, args in (
        ("bm_dev_request", C.c_int, [C.POINTER(vp), C.c_int]),
        ("bm_dev_free", None, [vp]),
        ("bm_malloc_device_byte", C.c_int, [vp, C.POINTER(mem), C.c_uint]),
        ("bm_free_device", None, [vp, mem]),
        ("bm_memcpy_s2d_partial_offset", C.c_int, [vp, mem, vp, C.c_uint, C.c_uint]),
        ("bm_memcpy_d2s_partial_offset", C.c_int, [vp, vp, mem, C.c_uint, C.c_uint]),
        ("bm_memcpy_d2d_byte", C.c_int, [vp, mem, C.c_size_t, mem, C.c_size_t, C.c_size_t]),
        ("bm_thread_sync", C.c_int, [vp]),
    ):
        f = getattr(bmlib, name)
        f.restype, f.argtypes = res, args
    for name, res, args in (
        ("bmrt_create", vp, [vp]),
        ("bmrt_destroy", None, [vp]),
        ("bmrt_load_bmodel", C.c_bool, [vp, C.c_char_p]),
        ("bmrt_get_network_number", C.c_int, [vp]),
        ("bmrt_get_network_names", None, [vp, C.POINTER(C.POINTER(C.c_char_p))]),
        ("bmrt_get_network_info", C.POINTER(NetInfo), [vp, C.c_char_p]),
        (
            "bmrt_launch_tensor_ex",
            C.c_bool,
            [vp, C.c_char_p, C.POINTER(Tensor), C.c_int, C.POINTER(Tensor), C.c_int, C.c_bool, C.c_bool],
        ),
    ):
        f = getattr(bmrt, name)
        f.restype, f.argtypes = res, args


class Runtime:
    """One device (or simulator) handle with a bmodel loaded."""

    def __init__(self, folder: str, bmodel: str, devid: int = 0, host_copies: bool = False):
        self.folder = folder
        self.host_copies = host_copies  # device-to-device copies through host memory
        self.bmlib, self.bmrt = _load(folder)
        self.handle = C.c_void_p()
        self.p = None
        self._mems: list[DeviceMem] = []
        with _lock, quiet_c_stdout():
            rc = self.bmlib.bm_dev_request(C.byref(self.handle), int(devid))
            if rc != 0:
                raise UserError(f"cannot open Sophgo device {devid} (bm_dev_request returned {rc})")
            self.p = self.bmrt.bmrt_create(self.handle)
            if not self.p:
                self.close()
                raise UserError("bmrt_create failed")
            if not self.bmrt.bmrt_load_bmodel(self.p, os.fsencode(bmodel)):
                self.close()
                raise UserError(f"bmrt could not load {bmodel} (built for another chip or damaged?)")
        self.nets = {name: self._net_info(name) for name in self.net_names()}

    def net_names(self) -> list[str]:
        n = self.bmrt.bmrt_get_network_number(self.p)
        names = C.POINTER(C.c_char_p)()
        self.bmrt.bmrt_get_network_names(self.p, C.byref(names))
        out = [names[i].decode() for i in range(n)]
        _libc().free(C.cast(names, C.c_void_p))
        return out

    def _net_info(self, name: str) -> NetIO:
        info = self.bmrt.bmrt_get_network_info(self.p, name.encode()).contents
        stage = info.stages[0]

        def tensors(num, names, dtypes, shapes):
            return [
                TensorInfo(names[i].decode(), DTYPES[dtypes[i]][0], dtypes[i], shapes[i].tuple()) for i in range(num)
            ]

        return NetIO(
            name,
            bool(info.is_dynamic),
            tensors(info.input_num, info.input_names, info.input_dtypes, stage.input_shapes),
            tensors(info.output_num, info.output_names, info.output_dtypes, stage.output_shapes),
        )

    # -- memory ----------------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> DeviceMem:
        mem = DeviceMem()
        with _lock:
            rc = self.bmlib.bm_malloc_device_byte(self.handle, C.byref(mem), C.c_uint(int(nbytes)))
        if rc != 0:
            raise UserError(f"cannot allocate {nbytes} bytes of device memory (error {rc})")
        self._mems.append(mem)
        return mem

    def free(self, mem: DeviceMem) -> None:
        with _lock:
            if any(m is mem for m in self._mems) and self.handle:
                self._mems = [m for m in self._mems if m is not mem]
                self.bmlib.bm_free_device(self.handle, mem)

    def upload(self, mem: DeviceMem, data: np.ndarray, offset: int = 0) -> None:
        data = np.ascontiguousarray(data)
        with _lock:
            rc = self.bmlib.bm_memcpy_s2d_partial_offset(self.handle, mem, data.ctypes.data, data.nbytes, int(offset))
        if rc != 0:
            raise RuntimeError(f"bm_memcpy_s2d failed ({rc})")

    def download(self, mem: DeviceMem, nbytes: int, offset: int = 0) -> np.ndarray:
        out = np.empty(int(nbytes), np.uint8)
        with _lock:
            rc = self.bmlib.bm_memcpy_d2s_partial_offset(self.handle, out.ctypes.data, mem, int(nbytes), int(offset))
        if rc != 0:
            raise RuntimeError(f"bm_memcpy_d2s failed ({rc})")
        return out

    def copy(self, dst: DeviceMem, dst_offset: int, src: DeviceMem, src_offset: int, nbytes: int) -> None:
        if self.host_copies:
            self.upload(dst, self.download(src, nbytes, src_offset), dst_offset)
            return
        with _lock, quiet_c_stdout():
            rc = self.bmlib.bm_memcpy_d2d_byte(self.handle, dst, int(dst_offset), src, int(src_offset), int(nbytes))
        if rc != 0:
            raise RuntimeError(f"bm_memcpy_d2d failed ({rc})")

    # -- running -----------------------------------------------------------------------------------------
    def launch(self, net: NetIO, inputs: list[DeviceMem], outputs: list[DeviceMem], input_shapes=None) -> None:
        """Run a net on device memory (outputs written into the given buffers)."""
        ins = (Tensor * len(inputs))()
        for i, (t, mem) in enumerate(zip(net.inputs, inputs, strict=True)):
            ins[i].dtype, ins[i].device_mem, ins[i].st_mode = t.dtype_code, mem, 0
            ins[i].shape = Shape.of(input_shapes[i] if input_shapes else t.shape)
        outs = (Tensor * len(outputs))()
        for i, (t, mem) in enumerate(zip(net.outputs, outputs, strict=True)):
            outs[i].dtype, outs[i].device_mem, outs[i].st_mode = t.dtype_code, mem, 0
            outs[i].shape = Shape.of(t.shape)
        with _lock, quiet_c_stdout():
            ok = self.bmrt.bmrt_launch_tensor_ex(
                self.p, net.name.encode(), ins, len(inputs), outs, len(outputs), True, False
            )
            if ok:
                ok = self.bmlib.bm_thread_sync(self.handle) == 0
        if not ok:
            raise RuntimeError(f"bmrt failed to run net {net.name}")

    def run(self, name: str, *inputs: np.ndarray) -> list[np.ndarray]:
        """One net on host arrays, in input order (converted to the net's types), with buffers of its own;
        its outputs as float32 (int32 for ids). For tests and measurements."""
        net = self.nets[name]
        ins = [self.alloc(t.nbytes) for t in net.inputs]
        outs = [self.alloc(t.nbytes) for t in net.outputs]
        try:
            for mem, t, data in zip(ins, net.inputs, inputs, strict=True):
                self.upload(mem, to_device_dtype(np.asarray(data).reshape(t.shape), t.dtype))
            self.launch(net, ins, outs)
            return [
                from_device_dtype(self.download(mem, t.nbytes), t.dtype).reshape(t.shape)
                for mem, t in zip(outs, net.outputs, strict=True)
            ]
        finally:
            for mem in ins + outs:
                self.free(mem)

    def close(self) -> None:
        with _lock:
            if self.handle:
                for mem in self._mems:
                    self.bmlib.bm_free_device(self.handle, mem)
                self._mems = []
                with quiet_c_stdout():
                    if self.p:
                        self.bmrt.bmrt_destroy(self.p)
                    self.bmlib.bm_dev_free(self.handle)
                self.p = None
                self.handle = C.c_void_p()
