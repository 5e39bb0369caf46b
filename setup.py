"""Build step for the one compiled part: the 4-bit matmul kernel for ONNX Runtime
(internvl_edge/kernels). Everything else is in pyproject.toml.

The library is optional: where it does not compile (no C compiler, another compiler) the install
still succeeds and the runtime keeps ONNX Runtime's own MatMulNBits kernel. It is plain C against
ONNX Runtime's C ABI, so it needs neither ORT headers nor Python headers' API; it is built as an
extension module only so that pip compiles and installs it with the package.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "internvl_edge.kernels._q4",
            sources=[
                f"internvl_edge/kernels/{name}.c"
                for name in (
                    "ort_op",
                    "ort_attention",
                    "ort_layer",
                    "ort_bf16",
                    "ort_glue",
                    "q4gemm",
                    "bf16gemm",
                    "attention",
                    "isa",
                    "rms_norm",
                )
            ],
            depends=[
                f"internvl_edge/kernels/{name}"
                for name in (
                    "q4gemm.h",
                    "bf16gemm.h",
                    "q4gemm_isa.inc",
                    "attention.h",
                    "attention_isa.inc",
                    "vec_exp.h",
                    "ort_abi.h",
                    "ort_glue.h",
                    "ort_parts.h",
                    "isa.h",
                    "rms_norm.h",
                )
            ],
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-fno-math-errno",
                "-fvisibility=hidden",
                "-Wno-psabi",
                "-ffp-contract=fast",
            ],  # ISO C mode would not fuse a * b + c into FMAs
            libraries=["m"],  # expf in the fused SwiGLU
            optional=True,
        )
    ]
)
