/* Which x86-64 instruction set the kernels run with here: the best this CPU has, or a lower one
 * named in INTERNVL_EDGE_ISA ("avx2", "avxvnni", "avx512vnni"), so that the tests can run every
 * variant on one machine (a CPU with AVX512-VNNI has the others too, AVX-VNNI aside). */
#ifndef INTERNVL_EDGE_ISA_H
#define INTERNVL_EDGE_ISA_H

typedef enum { IE_ISA_NONE, IE_ISA_AVX2, IE_ISA_AVXVNNI, IE_ISA_AVX512VNNI } ie_isa_t;

ie_isa_t ie_isa(void);
const char *ie_isa_name(ie_isa_t isa);

#endif
