/* Peak issue rates of the AVX-512 instructions the prefill GEMMs are built on, one core, and
 * what a GEMM micro-kernel's other work (f32 scaling, conversions, operand loads) costs beside
 * them. A kernel's GOP/s divided by these peaks says how far it is from the core's limit.
 *
 *     gcc -O2 scripts/bench/avx512_throughput.c -o target/avx512_throughput && target/avx512_throughput
 *
 * Every loop is inline assembly with 12 independent accumulators (no dependency chain longer
 * than the instruction's latency allows), so the compiler cannot reorder or spill anything.
 * Needs AVX-512 F, VNNI and BF16 (Zen 4; Intel Cooper Lake, Sapphire Rapids and later). */
#pragma GCC target("avx512f")
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CLOBBERS "rcx", "rax", "rdx", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", \
    "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", \
    "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", \
    "xmm27", "xmm28"

/* Runs `body` N times; prints the rate of its `per` main instructions. */
#define RUN(name, per, body)                                                                    \
    {                                                                                           \
        double t0 = now();                                                                      \
        __asm__ volatile("mov %0, %%rcx\n1:\nmov %1, %%rax\nmov %2, %%rdx\n" body                \
                         "dec %%rcx\njnz 1b\n" ::"r"(n), "r"(w), "r"(x) : CLOBBERS);              \
        double t1 = now();                                                                      \
        printf("%-52s %6.3f G/s\n", name, n * (double)(per) / (t1 - t0) / 1e9);                 \
    }

#define ALL12(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)
#define DPBUSD(i) "vpdpbusd %%zmm30, %%zmm31, %%zmm" #i "\n"
#define DPBF16(i) "vdpbf16ps %%zmm30, %%zmm31, %%zmm" #i "\n"
#define FMA(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n"
#define DPBUSD96 ALL12(DPBUSD) ALL12(DPBUSD) ALL12(DPBUSD) ALL12(DPBUSD) \
                 ALL12(DPBUSD) ALL12(DPBUSD) ALL12(DPBUSD) ALL12(DPBUSD)
/* A block's scaling in f32: 12 accumulators (zmm12..23) take one or two FMAs each. */
#define FMA_ACC(i) "vfmadd231ps %%zmm30, %%zmm31, %%zmm" #i "\n"
#define FMA12 FMA_ACC(12) FMA_ACC(13) FMA_ACC(14) FMA_ACC(15) FMA_ACC(16) FMA_ACC(17) \
              FMA_ACC(18) FMA_ACC(19) FMA_ACC(20) FMA_ACC(21) FMA_ACC(22) FMA_ACC(23)
#define CVT(i) "vcvtdq2ps %%zmm" #i ", %%zmm24\n"
/* One 4-value group of a 6 x 32 int8 tile: two weight loads, six input broadcasts. */
#define ROW(o, r, a, b) "vpbroadcastd " #o "*4+" #r "*1024(%%rdx), %%zmm26\n" \
    "vpdpbusd %%zmm24, %%zmm26, %%zmm" #a "\nvpdpbusd %%zmm25, %%zmm26, %%zmm" #b "\n"
#define GROUP(o) "vmovdqa64 " #o "*128(%%rax), %%zmm24\nvmovdqa64 " #o "*128+64(%%rax), %%zmm25\n" \
    ROW(o, 0, 0, 1) ROW(o, 1, 2, 3) ROW(o, 2, 4, 5) ROW(o, 3, 6, 7) ROW(o, 4, 8, 9) ROW(o, 5, 10, 11)

/* A whole block of the 6 x 32 int8 kernel: the sums start from zero, take the block's 8 groups,
 * then q4k's f32 scaling (per row: a broadcast input sum; per register: a conversion, an FMA by
 * the scales and an FMA by the offsets, both from memory) into 12 f32 accumulators. */
#define ZERO(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n"
#define SCALE(r, a, b, x, y) "vbroadcastss " #r "*4+4096(%%rdx), %%zmm26\n" \
    "vcvtdq2ps %%zmm" #a ", %%zmm" #a "\nvfmadd231ps 4096(%%rax), %%zmm" #a ", %%zmm" #x "\n" \
    "vfnmadd231ps 4224(%%rax), %%zmm26, %%zmm" #x "\n" \
    "vcvtdq2ps %%zmm" #b ", %%zmm" #b "\nvfmadd231ps 4160(%%rax), %%zmm" #b ", %%zmm" #y "\n" \
    "vfnmadd231ps 4288(%%rax), %%zmm26, %%zmm" #y "\n"
#define Q4K_BLOCK ZERO(0) ZERO(1) ZERO(2) ZERO(3) ZERO(4) ZERO(5) ZERO(6) ZERO(7) ZERO(8) ZERO(9) \
    ZERO(10) ZERO(11) GROUP(0) GROUP(1) GROUP(2) GROUP(3) GROUP(4) GROUP(5) GROUP(6) GROUP(7) \
    SCALE(0, 0, 1, 12, 13) SCALE(1, 2, 3, 14, 15) SCALE(2, 4, 5, 16, 17) SCALE(3, 6, 7, 18, 19) \
    SCALE(4, 8, 9, 20, 21) SCALE(5, 10, 11, 22, 23)

int main(void) {
    long n = 3000000;
    char *w = aligned_alloc(64, 8192), *x = aligned_alloc(64, 8192);
    for (int i = 0; i < 8192; i++) {
        w[i] = (char)i;
        x[i] = (char)(7 * i);
    }
    for (int i = 4096; i < 8192; i += 4) /* scales, offsets and input sums: ordinary floats */
        *(float *)(w + i) = *(float *)(x + i) = 0.5f;
    RUN("vpdpbusd zmm (64 int8 MACs)", 96, DPBUSD96)
    RUN("vdpbf16ps zmm (32 BF16 MACs)", 96, ALL12(DPBF16) ALL12(DPBF16) ALL12(DPBF16) ALL12(DPBF16)
        ALL12(DPBF16) ALL12(DPBF16) ALL12(DPBF16) ALL12(DPBF16))
    RUN("vfmadd231ps zmm (16 f32 MACs)", 96, ALL12(FMA) ALL12(FMA) ALL12(FMA) ALL12(FMA)
        ALL12(FMA) ALL12(FMA) ALL12(FMA) ALL12(FMA))
    RUN("vpdpbusd, with 12 vcvtdq2ps per 96", 96, DPBUSD96 ALL12(CVT))
    RUN("vpdpbusd, with 12 vfmadd231ps per 96", 96, DPBUSD96 FMA12)
    RUN("vpdpbusd, with 24 vfmadd231ps per 96", 96, DPBUSD96 FMA12 FMA12)
    RUN("vpdpbusd of a 6x32 tile, operands from L1", 96,
        GROUP(0) GROUP(1) GROUP(2) GROUP(3) GROUP(4) GROUP(5) GROUP(6) GROUP(7))
    RUN("vpdpbusd of a whole q4k block (tile + f32 scaling)", 96, Q4K_BLOCK)
    return 0;
}
