/* isa.h: CPU detection once per process, capped by INTERNVL_EDGE_ISA. */
#define _GNU_SOURCE /* syscall */
#include "isa.h"

#include <stdlib.h>
#include <string.h>
#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023 /* ask for an extended state component (arch/x86/include/uapi/asm/prctl.h) */
#define XFEATURE_XTILEDATA 18      /* the AMX tile data */
#endif

static const char *const names[] = {"none", "avx2", "avxvnni", "avx512vnni"};

const char *isa_name(isa_t isa) { return names[isa]; }

#if defined(__x86_64__) && defined(__GNUC__)
static int has(isa_t isa) {
    __builtin_cpu_init();
    /* F16C (float16 scales in q4gemm's tables) came before AVX2 on every x86-64 line that has both */
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    switch (isa) {
    case ISA_AVX2: return avx2;
    case ISA_AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni");
    case ISA_AVX512VNNI:
        return avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    default: return 0;
    }
}

static isa_t detect(void) {
    const char *wanted = getenv("INTERNVL_EDGE_ISA");
    for (int isa = ISA_AVX512VNNI; isa > ISA_NONE; isa--) {
        if (wanted && *wanted && strcmp(wanted, names[isa]) != 0) continue; /* not the one asked for */
        if (has((isa_t)isa)) return (isa_t)isa;
    }
    return ISA_NONE; /* none, or the one asked for is not on this CPU */
}
#else
static isa_t detect(void) { return ISA_NONE; }
#endif

isa_t isa_selected(void) {
    static int cached = -1; /* a race here only detects twice, with the same answer */
    if (cached < 0) cached = (int)detect();
    return (isa_t)cached;
}

int isa_prefetch_nta(void) {
    static int cached = -1; /* as above */
    if (cached < 0) {
        const char *v = getenv("INTERNVL_EDGE_PREFETCH");
        if (v && strcmp(v, "nta") == 0)
            cached = 1;
        else if (v && strcmp(v, "t2") == 0)
            cached = 0;
        else {
#if defined(__x86_64__) && defined(__GNUC__)
            __builtin_cpu_init();
            cached = __builtin_cpu_is("amd") ? 1 : 0;
#else
            cached = 0;
#endif
        }
    }
    return cached;
}

int isa_batch_invariant(void) {
    static int cached = -1; /* as above: a race reads the variable twice */
    if (cached < 0) {
        const char *v = getenv("INTERNVL_EDGE_BATCH_INVARIANT");
        cached = !(v && strcmp(v, "0") == 0);
    }
    return cached;
}

int isa_amx(int edx_bit) {
#if defined(__linux__) && defined(__x86_64__) && defined(__GNUC__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << edx_bit))) return 0;
    /* Linux gives a process the tile registers only when it asks (5.16 and newer); asking again is a
     * no-op */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    (void)edx_bit;
    return 0;
#endif
}
