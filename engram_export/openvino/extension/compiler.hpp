// Compiler-specific attributes, each with a portable fallback.

#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// one copy of the function per instruction set, chosen at load time (vectorized loops run AVX-512 where
// the CPU has it, AVX2 or baseline elsewhere)
#define ENGRAM_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ENGRAM_TARGET_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ENGRAM_ALWAYS_INLINE __attribute__((always_inline)) inline
#define ENGRAM_PREFETCH(address) __builtin_prefetch(address)
#else
#define ENGRAM_ALWAYS_INLINE inline
#define ENGRAM_PREFETCH(address) ((void)(address))
#endif
