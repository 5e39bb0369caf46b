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

#endif
