/*
 * Copy tensors into a checkpoint's slot file (mapped into memory) and checksum them in the same
 * pass, so that the checksum costs no second read of the data.
 *
 * Built on first use by pyro_scvi/io/slot_file.py and loaded with ctypes; slot_file.py's torch
 * path (Tensor.copy_ and a sum) is the reference, and tests/test_checkpoint_slot.py checks that
 * both give the same bytes and checksums.
 *
 * The checksum of a tensor is the sum, modulo 2^64, of its bytes read as 64-bit integers when its
 * size is a multiple of 8 bytes, and as signed 32-bit integers otherwise (sizes are multiples of 4).
 * The loops are plain C that gcc and clang vectorise at -O3 for any SIMD width; a large tensor is
 * split between OpenMP threads (memory bandwidth, not arithmetic, limits the copy, and one core
 * does not use all of it).
 */
#include <stdint.h>
#include <string.h>

#ifndef PYRO_SCVI_BUILD_FLAGS
#define PYRO_SCVI_BUILD_FLAGS "unknown"
#endif

/* Bytes below which a tensor is copied by one thread: starting threads costs more than it saves. */
#define PARALLEL_BYTES (1 << 20)

const char *slot_copy_build_flags(void) { return PYRO_SCVI_BUILD_FLAGS; }

static uint64_t copy_sum64(uint64_t *restrict dst, const uint64_t *restrict src, int64_t n, int n_threads)
{
    uint64_t sum = 0;
    int64_t i;
    (void)n_threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) reduction(+ : sum) schedule(static) if (n * 8 >= PARALLEL_BYTES)
#endif
    for (i = 0; i < n; i++) { /* vector loop: copy and sum, 64-bit */
        uint64_t word = src[i];
        sum += word;
        dst[i] = word;
    }
    return sum;
}

static uint64_t copy_sum32(int32_t *restrict dst, const int32_t *restrict src, int64_t n)
{
    uint64_t sum = 0;
    for (int64_t i = 0; i < n; i++) { /* vector loop: copy and sum, 32-bit */
        int32_t word = src[i];
        sum += (uint64_t)(int64_t)word;
        dst[i] = word;
    }
    return sum;
}

/*
 * Copy n_tensors tensors: sources[k] (contiguous, n_bytes[k] bytes, a multiple of 4) to base +
 * offsets[k], and write each one's checksum into sums[k]. Offsets are multiples of 8.
 */
void slot_copy(int64_t n_tensors, const uint64_t *sources, const int64_t *n_bytes, char *base,
               const int64_t *offsets, uint64_t *sums, int n_threads)
{
    for (int64_t k = 0; k < n_tensors; k++) {
        const void *src = (const void *)(uintptr_t)sources[k];
        void *dst = base + offsets[k];
        if (n_bytes[k] % 8 == 0)
            sums[k] = copy_sum64((uint64_t *)dst, (const uint64_t *)src, n_bytes[k] / 8, n_threads);
        else
            sums[k] = copy_sum32((int32_t *)dst, (const int32_t *)src, n_bytes[k] / 4);
    }
}
