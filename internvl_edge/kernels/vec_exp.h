/* e^x on GCC vectors of floats, to ~2 ulp over [-87, 88]: Cody-Waite reduction by ln 2 and Cephes'
 * expf polynomial (https://www.netlib.org/cephes/, single/expf.c). Inputs are clamped to that range,
 * so e^-inf is ~1e-38 (callers mask where it must be 0) and a sigmoid saturates instead of making
 * inf / inf.
 *
 * VEC_EXP_DEFINE(name, VF, VI) defines `static inline VF name(VF x)` for a float vector type VF
 * and the int32 vector type VI of the same width: written once, instantiated per width and
 * instruction set (attention.c: 16 lanes; q4gemm_isa.inc: 8, once per ISA it is compiled for). */
#ifndef INTERNVL_EDGE_VEC_EXP_H
#define INTERNVL_EDGE_VEC_EXP_H

#define VEC_EXP_DEFINE(name, VF, VI)                                                          \
    static inline __attribute__((always_inline)) VF name(VF x)                                \
    {                                                                                         \
        const VF zero = {0}, lo = zero - 87.0f, hi = zero + 88.0f;                            \
        const VI below = x < lo, above = x > hi; /* lanes of -1 where true */                 \
        x = (VF)(((VI)lo & below) | ((VI)x & ~below));                                        \
        x = (VF)(((VI)hi & above) | ((VI)x & ~above));                                        \
        const VF round = zero + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */ \
        const VF n = (x * 1.44269504088896341f + round) - round;                              \
        VF r = x - n * 0.693359375f;                                                          \
        r = r + n * 2.12194440e-4f;                                                           \
        VF y = r * 1.9875691500e-4f + 1.3981999507e-3f;                                       \
        y = y * r + 8.3334519073e-3f;                                                         \
        y = y * r + 4.1665795894e-2f;                                                         \
        y = y * r + 1.6666665459e-1f;                                                         \
        y = y * r + 5.0000001201e-1f;                                                         \
        y = y * r * r + r + 1.0f;                                                             \
        const VI e = (__builtin_convertvector(n, VI) + 127) << 23;                            \
        return y * (VF)e;                                                                     \
    }

#endif
