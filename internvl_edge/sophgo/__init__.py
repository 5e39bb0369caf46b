"""Sophgo BM1684X / BM1688 target: TPU-MLIR's native tools compile the nets into one bmodel, and the
bmrt runtime (libsophon on a board, the toolchain's chip simulator elsewhere) runs it.

    toolchain.py   fetch, prepare and locate TPU-MLIR (pinned PyPI wheel, unpacked into the user cache)
    weights.py     checkpoint tensors in the layouts the top dialect reads (4-bit A16MatMul, rotary tables)
    mlir.py        top-dialect MLIR text + weight .npz for every net of the seed's split
    compile.py     the tpuc-opt pass pipeline per net, in parallel, then `model_tool --combine`
    bmrt.py        ctypes over libbmrt/libbmlib (backends/bmrt.py runs a bundle's bmodel with it)
"""

CHIPS = ("bm1684x", "bm1688")
