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
 *
 * Memory bandwidth, not arithmetic, limits the copy, and one core does not use all of it: a large
 * tensor is split between OpenMP threads. On x86-64 large tensors are written with non-temporal
 * (streaming) stores, SSE2 being part of every x86-64 CPU: the destination's cache lines are not
 * read before they are written, and the copy does not push the training's weights out of the
 * caches. Elsewhere the loops are plain C that gcc and clang vectorise at -O3.
 */
#include <stdint.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifndef PYRO_SCVI_BUILD_FLAGS
#define PYRO_SCVI_BUILD_FLAGS "unknown"
#endif

/* Bytes from which a tensor is split between threads and streamed: below, starting threads costs
 * more than it saves, and the tensor may as well stay in the cache. */
#define LARGE_BYTES (1 << 20)

const char *slot_copy_build_flags(void) { return PYRO_SCVI_BUILD_FLAGS; }

/* Whether this build streams large tensors (1) or copies them through the caches (0). */
int slot_copy_streams(void)
{
#if defined(__SSE2__)
    return 1;
#else
    return 0;
#endif
}

/* Copy n words and return their sum: one thread's share of a tensor. */
static uint64_t copy_sum64_part(uint64_t *restrict dst, const uint64_t *restrict src, int64_t n, int stream)
{
    uint64_t sum = 0;
    int64_t i = 0;
#if defined(__SSE2__)
    if (stream) {
        for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++) { /* to a 16-byte boundary */
            sum += src[i];
            dst[i] = src[i];
        }
        __m128i sums = _mm_setzero_si128();
        for (; i + 2 <= n; i += 2) {
            __m128i words = _mm_loadu_si128((const __m128i *)(src + i));
            sums = _mm_add_epi64(sums, words);
            _mm_stream_si128((__m128i *)(dst + i), words);
        }
        uint64_t lanes[2];
        _mm_storeu_si128((__m128i *)lanes, sums);
        sum += lanes[0] + lanes[1];
        _mm_sfence(); /* this thread's streamed stores are done before the copy returns */
    }
#else
    (void)stream;
#endif
    for (; i < n; i++) { /* vector loop: copy and sum, 64-bit */
        uint64_t word = src[i];
        sum += word;
        dst[i] = word;
    }
    return sum;
}

static uint64_t copy_sum64(uint64_t *dst, const uint64_t *src, int64_t n, int n_threads)
{
    if (n * 8 < LARGE_BYTES || n_threads < 2)
        return copy_sum64_part(dst, src, n, n * 8 >= LARGE_BYTES);
    uint64_t sum = 0;
    int64_t share = (n + n_threads - 1) / n_threads;
    int t;
#ifdef _OPENMP
#pragma omp parallel for num_threads(n_threads) reduction(+ : sum) schedule(static, 1)
#endif
    for (t = 0; t < n_threads; t++) {
        int64_t begin = (int64_t)t * share, end = begin + share < n ? begin + share : n;
        if (begin < end)
            sum += copy_sum64_part(dst + begin, src + begin, end - begin, 1);
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
