// Gram matrices on the CPU: the k(k+1)/2 pairwise dot products of k vectors, in double.
//
// Entries are staged in blocks of kBlock: each input's block is converted once into a
// double row of a small k x kBlock buffer (minus the base block, subtracted in the compute
// type), and the pair products are taken from there with simple vectorizable loops: a dot
// product per pair over the block (whole buffer, rows), or a product per pair and column
// added into per-column accumulators (columns). The dtype dispatch runs per (block, input),
// outside the inner loops; gram() checks the codes before the workers start.
#include "gram.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu_loads.h"
#include "fastmerge/dispatch.h"
#include "fastmerge/gram.h"
#include "fastmerge/parallel.h"

#define FM_INLINE __attribute__((always_inline)) inline

namespace fastmerge::cpu {
namespace {

// Entries per staged block (and the row stride of the staging buffer).
constexpr int64_t kBlock = 256;
// The whole buffer is cut into chunks of at least this many entries (at most kMaxChunks of
// them); rows and column tiles take a thread per this many entries. Tests use sizes just
// past it (tests/ops/test_gram.py, CPU_SPLIT).
constexpr int64_t kMinChunk = 1 << 14;
constexpr int64_t kMaxChunks = 256;
// Doubles of per-column accumulators of one column tile (pairs x tile width).
constexpr int64_t kColumnBudget = 8192;

struct Inputs {
  const void* const* data;
  const int32_t* dtypes;
  int64_t k;
  const void* base;  // null: no base
  int32_t base_dtype;
};

template <typename C, int32_t DT>
FM_INLINE void load_base(C* bb, const void* src, int64_t offset, int64_t len) {
  using E = Element<DT>;
  const auto* p = static_cast<const typename E::storage*>(src) + offset;
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) bb[e] = static_cast<C>(E::load(p, e));
}

// dst[e] = x[offset + e] as double: exact without a base (the compute type holds every
// input exactly); with one, (C(x) - C(base)) rounded in C, then widened.
template <typename C, int32_t DT>
FM_INLINE void load_x(double* dst, const void* src, int64_t offset, int64_t len, const C* bb) {
  using E = Element<DT>;
  const auto* p = static_cast<const typename E::storage*>(src) + offset;
  if (bb != nullptr) {
#pragma omp simd
    for (int64_t e = 0; e < len; ++e) {
      const C d = static_cast<C>(E::load(p, e)) - bb[e];
      dst[e] = static_cast<double>(d);
    }
  } else {
#pragma omp simd
    for (int64_t e = 0; e < len; ++e) dst[e] = E::load(p, e);
  }
}

// Entries [offset, offset + len) of every input into row i of xb (row stride kBlock).
template <typename C>
FM_INLINE void stage(const Inputs& in, int64_t offset, int64_t len, double* xb, C* bb) {
  const C* b = nullptr;
  if (in.base != nullptr) {
    dispatch_dtype(in.base_dtype, "gram: base_dtype", [&](auto tag) FM_INLINE_LAMBDA {
      load_base<C, decltype(tag)::code>(bb, in.base, offset, len);
    });
    b = bb;
  }
  for (int64_t i = 0; i < in.k; ++i) {
    double* dst = xb + i * kBlock;
    dispatch_dtype(in.dtypes[i], "gram: dtypes", [&](auto tag) FM_INLINE_LAMBDA {
      load_x<C, decltype(tag)::code>(dst, in.data[i], offset, len, b);
    });
  }
}

// acc[p] += sum over the block of x_i x_j, for every pair p = (i, j), i <= j.
FM_INLINE void block_dots(const double* xb, int64_t k, int64_t len, double* acc) {
  int64_t p = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double* xi = xb + i * kBlock;
    for (int64_t j = i; j < k; ++j, ++p) {
      const double* xj = xb + j * kBlock;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t e = 0; e < len; ++e) s += xi[e] * xj[e];
      acc[p] += s;
    }
  }
}

// Pair sums of entries [begin, begin + len) (one contiguous vector) into acc (zeroed here).
template <typename C>
FM_INLINE void segment(const Inputs& in, int64_t begin, int64_t len, double* acc, double* xb,
                       C* bb) {
  std::fill(acc, acc + gram_pairs(in.k), 0.0);
  for (int64_t e0 = 0; e0 < len; e0 += kBlock) {
    const int64_t n = std::min(kBlock, len - e0);
    stage<C>(in, begin + e0, n, xb, bb);
    block_dots(xb, in.k, n, acc);
  }
}

FM_CPU_CLONES void segment_f32(const Inputs& in, int64_t begin, int64_t len, double* acc,
                               double* xb, float* bb) {
  segment<float>(in, begin, len, acc, xb, bb);
}

FM_CPU_CLONES void segment_f64(const Inputs& in, int64_t begin, int64_t len, double* acc,
                               double* xb, double* bb) {
  segment<double>(in, begin, len, acc, xb, bb);
}

// Columns [m0, m0 + w) of a (rows, cols) layout, all rows: acc[p * w + c] is column
// m0 + c's sum for pair p (acc: pairs x w, zeroed here).
template <typename C>
FM_INLINE void column_tile(const Inputs& in, int64_t rows, int64_t cols, int64_t m0, int64_t w,
                           double* acc, double* xb, C* bb) {
  const int64_t k = in.k;
  std::fill(acc, acc + gram_pairs(k) * w, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    stage<C>(in, r * cols + m0, w, xb, bb);
    double* a = acc;
    for (int64_t i = 0; i < k; ++i) {
      const double* xi = xb + i * kBlock;
      for (int64_t j = i; j < k; ++j, a += w) {
        const double* xj = xb + j * kBlock;
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) a[c] += xi[c] * xj[c];
      }
    }
  }
}

FM_CPU_CLONES void column_tile_f32(const Inputs& in, int64_t rows, int64_t cols, int64_t m0,
                                   int64_t w, double* acc, double* xb, float* bb) {
  column_tile<float>(in, rows, cols, m0, w, acc, xb, bb);
}

FM_CPU_CLONES void column_tile_f64(const Inputs& in, int64_t rows, int64_t cols, int64_t m0,
                                   int64_t w, double* acc, double* xb, double* bb) {
  column_tile<double>(in, rows, cols, m0, w, acc, xb, bb);
}

// Pair sums (pair p at pairs[p * stride]) -> a full symmetric k x k matrix.
void store_matrix(const double* pairs, int64_t stride, int64_t k, double* out) {
  int64_t p = 0;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = i; j < k; ++j, ++p) {
      out[i * k + j] = pairs[p * stride];
      out[j * k + i] = pairs[p * stride];
    }
  }
}

int64_t thread_count(int64_t items, int64_t entries) {
  const int64_t by_work = (entries + kMinChunk - 1) / kMinChunk;
  return std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(get_num_threads()), items, by_work}));
}

template <typename C, typename Segment, typename Tile>
void run(const Inputs& in, int64_t rows, int64_t cols, int32_t mode, double* out,
         Segment segment_fn, Tile tile_fn) {
  const int64_t k = in.k;
  const int64_t pairs = gram_pairs(k);
  const int64_t n = rows * cols;
  if (mode == kGramWhole) {
    int64_t chunks = std::min(kMaxChunks, (n + kMinChunk - 1) / kMinChunk);
    int64_t chunk = (n + chunks - 1) / chunks;
    chunk = (chunk + kBlock - 1) / kBlock * kBlock;
    chunks = (n + chunk - 1) / chunk;
    std::vector<double> partials(chunks * pairs);
    const int64_t threads = std::min<int64_t>(get_num_threads(), chunks);
    global_pool().run(static_cast<int>(threads), [&](int t) {
      std::vector<double> xb(k * kBlock);
      std::vector<C> bb(kBlock);
      for (int64_t c = chunks * t / threads; c < chunks * (t + 1) / threads; ++c) {
        const int64_t begin = c * chunk;
        segment_fn(in, begin, std::min(chunk, n - begin), partials.data() + c * pairs, xb.data(),
                   bb.data());
      }
    });
    // in chunk order, whatever the threads were
    for (int64_t c = 1; c < chunks; ++c) {
      for (int64_t p = 0; p < pairs; ++p) partials[p] += partials[c * pairs + p];
    }
    store_matrix(partials.data(), 1, k, out);
  } else if (mode == kGramRows) {
    const int64_t threads = thread_count(rows, n);
    global_pool().run(static_cast<int>(threads), [&](int t) {
      std::vector<double> xb(k * kBlock), acc(pairs);
      std::vector<C> bb(kBlock);
      for (int64_t r = rows * t / threads; r < rows * (t + 1) / threads; ++r) {
        segment_fn(in, r * cols, cols, acc.data(), xb.data(), bb.data());
        store_matrix(acc.data(), 1, k, out + r * k * k);
      }
    });
  } else {
    // column tiles of width `width` (a multiple of 8, at most kBlock)
    const int64_t width =
        std::max<int64_t>(8, std::min<int64_t>(kBlock, kColumnBudget / pairs) / 8 * 8);
    const int64_t tiles = (cols + width - 1) / width;
    const int64_t threads = thread_count(tiles, n);
    global_pool().run(static_cast<int>(threads), [&](int t) {
      std::vector<double> xb(k * kBlock), acc(pairs * width);
      std::vector<C> bb(kBlock);
      for (int64_t tile = tiles * t / threads; tile < tiles * (t + 1) / threads; ++tile) {
        const int64_t m0 = tile * width;
        const int64_t w = std::min(width, cols - m0);
        tile_fn(in, rows, cols, m0, w, acc.data(), xb.data(), bb.data());
        for (int64_t c = 0; c < w; ++c) store_matrix(acc.data() + c, w, k, out + (m0 + c) * k * k);
      }
    });
  }
}

}  // namespace

void gram(const std::vector<const void*>& inputs, const std::vector<int32_t>& dtypes,
          const void* base, int32_t base_dtype, int64_t rows, int64_t cols, int32_t mode,
          bool float64, double* out) {
  const int64_t k = static_cast<int64_t>(inputs.size());
  if (k > kGramMaxTensors) {
    throw std::invalid_argument("gram takes at most " + std::to_string(kGramMaxTensors) +
                                " tensors, got " + std::to_string(k));
  }
  if (mode != kGramWhole && mode != kGramRows && mode != kGramColumns) {
    throw std::invalid_argument("gram: unknown mode " + std::to_string(mode));
  }
  if (dtypes.size() != inputs.size()) {
    throw std::invalid_argument("gram: dtypes and inputs differ in length");
  }
  for (const int32_t code : dtypes) check_dtype(code, "gram: dtypes");
  if (base != nullptr) check_dtype(base_dtype, "gram: base_dtype");
  const int64_t batch = gram_batch(mode, rows, cols);
  if (k == 0 || batch <= 0) return;
  if (gram_length(mode, rows, cols) <= 0) {
    std::fill(out, out + batch * k * k, 0.0);
    return;
  }
  const Inputs in{inputs.data(), dtypes.data(), k, base, base_dtype};
  if (float64) {
    run<double>(in, rows, cols, mode, out, segment_f64, column_tile_f64);
  } else {
    run<float>(in, rows, cols, mode, out, segment_f32, column_tile_f32);
  }
}

}  // namespace fastmerge::cpu
