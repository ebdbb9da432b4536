// One pass that copies a range and computes its xxh3-64: the copy and the hash
// go block by block (1 KiB, one xxh3 "block" of 16 stripes), so each block is
// hashed from L1 right after it is copied, and with streaming stores the
// hashing overlaps the memory traffic. Built on xxHash's own stripe
// accumulators (included inline here, in this file only), so the result is
// exactly XXH3_64bits of the bytes (tests/native/test_copy.py pins that).
// third_party/xxhash is xxHash v0.8.2 (BSD-2-Clause), header only.
#include "copy_hash.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#include <immintrin.h>
#define KVSTORE_X86 1
// xxHash's x86 variants side by side, each with its target attribute, as
// its own dispatcher compiles them; we pick one at run time.
#define XXH_X86DISPATCH
#define XXH_DISPATCH_AVX2 1
#define XXH_DISPATCH_AVX512 0
#define XXH_TARGET_SSE2 __attribute__((__target__("sse2")))
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#endif

#define XXH_INLINE_ALL
#include "third_party/xxhash/xxhash.h"

// The long-input path below is built from xxHash internals (XXH3_kSecret, the
// per-target stripe accumulators, XXH3_mergeAccs), which are not API and may
// change between releases: this code is written against exactly the vendored
// v0.8.2 (third_party/xxhash/VERSION), so a different header fails to build.
static_assert(XXH_VERSION_NUMBER == 802, "copy_hash.cpp relies on the internals of xxHash v0.8.2");

namespace kvstore::native::detail {

namespace {

constexpr std::size_t kSecretSize = sizeof(XXH3_kSecret);
constexpr std::size_t kStripesPerBlock = (kSecretSize - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;
constexpr std::size_t kBlock = XXH_STRIPE_LEN * kStripesPerBlock;  // 1 KiB

#ifdef KVSTORE_X86
// Streaming (non-temporal) stores: no cache line of the destination is read
// before it is overwritten, and the copy does not evict the caller's cache.
inline void stream_copy(std::byte* destination, const std::byte* source, std::size_t n) noexcept {
  std::size_t head = static_cast<std::size_t>(-reinterpret_cast<std::uintptr_t>(destination)) & 15;
  head = head < n ? head : n;
  std::memcpy(destination, source, head);
  destination += head;
  source += head;
  n -= head;
  const std::size_t body = n & ~static_cast<std::size_t>(63);
  for (std::size_t i = 0; i < body; i += 64) {
    const auto* in = reinterpret_cast<const __m128i*>(source + i);
    auto* out = reinterpret_cast<__m128i*>(destination + i);
    const __m128i a = _mm_loadu_si128(in), b = _mm_loadu_si128(in + 1);
    const __m128i c = _mm_loadu_si128(in + 2), d = _mm_loadu_si128(in + 3);
    _mm_stream_si128(out, a);
    _mm_stream_si128(out + 1, b);
    _mm_stream_si128(out + 2, c);
    _mm_stream_si128(out + 3, d);
  }
  std::memcpy(destination + body, source + body, n - body);
}
#endif

inline void copy(std::byte* destination, const std::byte* source, std::size_t n, bool streaming) noexcept {
#ifdef KVSTORE_X86
  if (streaming) {
    stream_copy(destination, source, n);
    return;
  }
#endif
  (void)streaming;
  std::memcpy(destination, source, n);
}

// XXH3_hashLong_64b_internal with the default secret, copying each block
// before accumulating it (len > XXH3_MIDSIZE_MAX).
#define KVSTORE_COPY_HASH_LONG(name, target)                                                    \
  target std::uint64_t copy_hash_long_##name(std::byte* destination, const std::byte* source,  \
                                             std::size_t len, bool streaming) noexcept {        \
    XXH_ALIGN(XXH_ACC_ALIGN) xxh_u64 acc[XXH_ACC_NB] = XXH3_INIT_ACC;                           \
    const xxh_u8* const secret = XXH3_kSecret;                                                  \
    const auto* const input = reinterpret_cast<const xxh_u8*>(source);                          \
    const std::size_t blocks = (len - 1) / kBlock;                                              \
    for (std::size_t n = 0; n < blocks; ++n) {                                                  \
      copy(destination + n * kBlock, source + n * kBlock, kBlock, streaming);                   \
      XXH3_accumulate_##name(acc, input + n * kBlock, secret, kStripesPerBlock);                \
      XXH3_scrambleAcc_##name(acc, secret + kSecretSize - XXH_STRIPE_LEN);                      \
    }                                                                                           \
    copy(destination + blocks * kBlock, source + blocks * kBlock, len - blocks * kBlock,        \
         streaming);                                                                            \
    const std::size_t stripes = ((len - 1) - kBlock * blocks) / XXH_STRIPE_LEN;                 \
    XXH3_accumulate_##name(acc, input + blocks * kBlock, secret, stripes);                      \
    XXH3_accumulate_512_##name(acc, input + len - XXH_STRIPE_LEN,                               \
                               secret + kSecretSize - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START); \
    return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START,                             \
                          static_cast<xxh_u64>(len) * XXH_PRIME64_1);                           \
  }

#ifdef KVSTORE_X86
KVSTORE_COPY_HASH_LONG(sse2, XXH_TARGET_SSE2)
KVSTORE_COPY_HASH_LONG(avx2, XXH_TARGET_AVX2)

using LongFn = std::uint64_t (*)(std::byte*, const std::byte*, std::size_t, bool) noexcept;

LongFn pick_long() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? &copy_hash_long_avx2 : &copy_hash_long_sse2;
}
#else
// Whatever xxHash selected at compile time (NEON, scalar, ...).
#define XXH3_accumulate_native XXH3_accumulate
#define XXH3_scrambleAcc_native XXH3_scrambleAcc
#define XXH3_accumulate_512_native XXH3_accumulate_512
KVSTORE_COPY_HASH_LONG(native, )
#endif

// XXH3_64bits_update with a given target's stripe accumulators.
#define KVSTORE_HASH_UPDATE(name, target)                                                \
  target void hash_update_##name(XXH3_state_t* state, const xxh_u8* input, std::size_t n) noexcept { \
    XXH3_update(state, input, n, XXH3_accumulate_##name, XXH3_scrambleAcc_##name);      \
  }

#ifdef KVSTORE_X86
KVSTORE_HASH_UPDATE(sse2, XXH_TARGET_SSE2)
KVSTORE_HASH_UPDATE(avx2, XXH_TARGET_AVX2)

using UpdateFn = void (*)(XXH3_state_t*, const xxh_u8*, std::size_t) noexcept;

UpdateFn pick_update() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") ? &hash_update_avx2 : &hash_update_sse2;
}
#else
KVSTORE_HASH_UPDATE(native, )
#endif

}  // namespace

struct StreamingHash::State {
  XXH3_state_t xxh;
};

StreamingHash::StreamingHash() : state_(std::make_unique<State>()) { XXH3_64bits_reset(&state_->xxh); }

StreamingHash::~StreamingHash() = default;

void StreamingHash::update(const std::byte* data, std::size_t n) noexcept {
  const auto* input = reinterpret_cast<const xxh_u8*>(data);
#ifdef KVSTORE_X86
  static const UpdateFn update_fn = pick_update();
  update_fn(&state_->xxh, input, n);
#else
  hash_update_native(&state_->xxh, input, n);
#endif
}

std::uint64_t StreamingHash::digest() const noexcept { return XXH3_64bits_digest(&state_->xxh); }

std::uint64_t copy_hash(std::byte* destination, const std::byte* source, std::size_t n,
                        bool streaming) noexcept {
  if (n <= XXH3_MIDSIZE_MAX) {
    std::memcpy(destination, source, n);
    return XXH3_64bits(source, n);
  }
#ifdef KVSTORE_X86
  static const LongFn long_fn = pick_long();
  const std::uint64_t hash = long_fn(destination, source, n, streaming);
  if (streaming) {
    _mm_sfence();  // streaming stores are weakly ordered: make them visible before returning
  }
  return hash;
#else
  return copy_hash_long_native(destination, source, n, streaming);
#endif
}

}  // namespace kvstore::native::detail
