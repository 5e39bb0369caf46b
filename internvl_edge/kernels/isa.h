/* Which x86-64 instruction set the kernels run with here: the best this CPU has, or a lower one
 * named in INTERNVL_EDGE_ISA ("avx2", "avxvnni", "avx512vnni"), so that the tests can run every
 * variant on one machine (a CPU with AVX512-VNNI has the others too, AVX-VNNI aside). */
#ifndef INTERNVL_EDGE_ISA_H
#define INTERNVL_EDGE_ISA_H

typedef enum { ISA_NONE, ISA_AVX2, ISA_AVXVNNI, ISA_AVX512VNNI } isa_t;

isa_t isa_selected(void);
const char *isa_name(isa_t isa);

/* 1 (default) unless INTERNVL_EDGE_BATCH_INVARIANT=0: every kernel computes a row in one order
 * whatever else shares the call, so a sequence's results do not depend on its batch or on how its
 * prefill was chunked (README, "Serving"). 0 lets prefill attention take its tiled path, faster on
 * long prompts, whose order differs from decode's. Read once per process. */
int isa_batch_invariant(void);

/* 1 where the kernels' software prefetches of data read once per token (4-bit weights, KV rows) take
 * the non-temporal hint, 0 where they take T2. AMD's cores keep an NTA line out of the L2 and L3 only:
 * there it spares the KV rows and activations (decode 1.02-1.03x against T0 on Zen 5). Intel's server
 * cores fetch an NTA line into L1 alone, through its few fill buffers, and their L2 streamer does not
 * take it up: on a Xeon with AMX the 4-bit linears read 11-12 GB/s with NTA and 26-42 GB/s with T2
 * (benchmarks/matmulnbits.py, 2 threads; docs/performance-notes.md). INTERNVL_EDGE_PREFETCH=nta|t2
 * overrides the choice (for measuring it). Read once per process. */
int isa_prefetch_nta(void);

/* 1 when the CPU has AMX-TILE and the AMX feature at bit `edx_bit` of CPUID.(7,0):EDX (22: AMX-BF16,
 * 25: AMX-INT8) and Linux grants the process the tile data, else 0. Asks Linux at each call: callers
 * keep the answer. */
int isa_amx(int edx_bit);

#endif
