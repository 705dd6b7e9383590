// Batched exact linear assignment on the CPU: Jonker-Volgenant initialization for
// square problems, then shortest augmenting paths (fastmerge/lap.h) for the rows left.
//
// Costs are read as float or double (T) and every distance is computed in double:
// float -> double is exact, so a float32 matrix is solved exactly as its float64 cast
// while reading half the bytes (the searches are bound by reading cost rows).
#include "linear_assignment.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <thread>
#include <vector>

#include "cpu_loads.h"  // FM_CPU_CLONES
#include "fastmerge/dtypes.h"  // half_to_float, bfloat16_to_float
#include "fastmerge/lap.h"
#include "fastmerge/parallel.h"

namespace fastmerge::cpu {
namespace {

constexpr int32_t kSolved = kStatusSolved;
constexpr int32_t kInfeasible = kStatusInfeasible;
constexpr int32_t kInvalid = kStatusInvalid;

// Columns per block of the vectorized scan: the best block is found with vector min
// reductions, and only blocks holding the minimum are searched for its column.
constexpr int64_t kScanBlock = 64;
// From this many columns a problem solved alone shares each search step's scan with the
// other threads: below it, a step is too short to pay for handing out its chunks.
constexpr int64_t kTeamMinColumns = 1536;
constexpr int kMaxTeam = 64;

// Working memory of one problem; reused across the problems a thread solves.
template <typename T>
struct Problem {
  std::vector<T> cost;  // oriented copy (rows <= cols, minimization), when needed
  std::vector<double> u, v, shortest, closed_col, block_min;  // block_min: per thread
  std::vector<int64_t> path, col4row, row4col, free_rows, argmin, matches;
  std::vector<uint8_t> visited_row;

  lap::Workspace resize(int64_t nr, int64_t nc) {
    u.assign(nr, 0.0);
    v.assign(nc, 0.0);
    shortest.resize(nc);
    closed_col.resize(nc);
    block_min.resize(kMaxTeam * ((nc + kScanBlock - 1) / kScanBlock + 1));  // per thread
    path.resize(nc);
    col4row.assign(nr, -1);
    row4col.assign(nc, -1);
    visited_row.resize(nr);
    return lap::Workspace{u.data(),    v.data(),       shortest.data(),    path.data(),
                          col4row.data(), row4col.data(), visited_row.data(), closed_col.data()};
  }
};

// Relaxes columns [b0, b1) through row i and returns their smallest open distance.
// Branch-free (closed columns carry +inf) so that it vectorizes.
template <typename T>
__attribute__((always_inline)) inline double relax_block(const T* row_cost, double base,
                                                         int64_t i, int64_t b0, int64_t b1,
                                                         const double* v, const double* closed,
                                                         double* shortest, int64_t* path) {
  double block_min = INFINITY;
#pragma omp simd reduction(min : block_min)
  for (int64_t j = b0; j < b1; ++j) {
    const double r = base + static_cast<double>(row_cost[j]) - v[j] + closed[j];
    const bool improve = r < shortest[j];
    shortest[j] = improve ? r : shortest[j];
    path[j] = improve ? i : path[j];
    const double candidate = shortest[j] + closed[j];
    block_min = candidate < block_min ? candidate : block_min;
  }
  return block_min;
}

#define FM_RELAX_CLONE(T)                                                                   \
  FM_CPU_CLONES double relax(const T* row_cost, double base, int64_t i, int64_t b0,         \
                             int64_t b1, const double* v, const double* closed, double* s, \
                             int64_t* path) {                                               \
    return relax_block(row_cost, base, i, b0, b1, v, closed, s, path);                      \
  }
FM_RELAX_CLONE(float)
FM_RELAX_CLONE(double)
#undef FM_RELAX_CLONE

// This thread's best candidate in columns [first, last): relax them through row i and
// prefer a free column among the tied minima (it ends the search at once).
template <typename T>
lap::Candidate scan_range(const T* row_cost, int64_t i, double base, int64_t first,
                          int64_t last, const lap::Workspace& w, double* block_min) {
  double best_value = INFINITY;
  for (int64_t b0 = first, k = 0; b0 < last; b0 += kScanBlock, ++k) {
    block_min[k] = relax(row_cost, base, i, b0, std::min(last, b0 + kScanBlock), w.v,
                         w.closed_col, w.shortest, w.path);
    best_value = std::min(best_value, block_min[k]);
  }
  if (!(best_value < INFINITY)) return lap::Candidate{INFINITY, -1, false};
  int64_t tied = -1;
  for (int64_t b0 = first, k = 0; b0 < last; b0 += kScanBlock, ++k) {
    if (block_min[k] != best_value) continue;
    for (int64_t j = b0; j < std::min(last, b0 + kScanBlock); ++j) {
      if (w.closed_col[j] != 0.0 || w.shortest[j] != best_value) continue;
      if (w.row4col[j] == -1) return lap::Candidate{best_value, j, true};
      if (tied < 0) tied = j;
    }
  }
  return lap::Candidate{best_value, tied, false};
}

lap::Candidate better_of(const lap::Candidate& a, const lap::Candidate& b) {
  if (b.position < 0) return a;
  if (a.position < 0) return b;
  return lap::better(b, a) ? b : a;
}

// Helper threads that scan column chunks for one leader's search steps.
//
// The leader runs the whole search (lap.h with a team of one). Each step it publishes
// the row to relax through and the chunks become claimable; every thread, the leader
// included, claims chunks until none are left, and the leader then waits only for
// chunks a helper has actually claimed. A helper that is descheduled (a busy machine)
// therefore never stalls a step: the leader just scans more chunks itself. A barrier
// between the threads, by contrast, made a contended 1024 x 1024 problem 3-5x slower.
template <typename T>
class ScanCrew {
 public:
  static constexpr int kChunks = 8;

  ScanCrew(int64_t nc, const lap::Workspace& w, double* scratch)
      : nc_(nc), w_(w), scratch_(scratch), blocks_per_chunk_(chunk_columns(nc) / kScanBlock) {}

  // The leader: one search step over all columns.
  lap::Candidate scan(const T* row_cost, int64_t i, double base) {
    row_cost_ = row_cost;
    row_ = i;
    base_ = base;
    done_.store(0, std::memory_order_relaxed);
    next_.store(0, std::memory_order_release);  // publishes the step to claimers
    generation_.fetch_add(1, std::memory_order_release);
    work(0);
    while (done_.load(std::memory_order_acquire) < kChunks) {
    }
    lap::Candidate best{INFINITY, -1, false};
    for (const auto& slot : slots_) best = better_of(best, slot);
    return best;
  }

  // A helper (rank >= 1): serve steps until the leader says stop.
  void serve(int rank) {
    int64_t seen = 0;
    for (int spins = 0;;) {
      if (stop_.load(std::memory_order_acquire)) return;
      const int64_t generation = generation_.load(std::memory_order_acquire);
      if (generation == seen) {
        if (++spins > 2048) std::this_thread::yield();
        continue;
      }
      seen = generation;
      spins = 0;
      work(rank);
    }
  }

  void stop() { stop_.store(true, std::memory_order_release); }

 private:
  static int64_t chunk_columns(int64_t nc) {
    const int64_t per_chunk = (nc + kChunks - 1) / kChunks;
    return (per_chunk + kScanBlock - 1) / kScanBlock * kScanBlock;
  }

  void work(int rank) {
    double* block_min = scratch_ + rank * (blocks_per_chunk_ + 1);
    for (;;) {
      const int c = next_.fetch_add(1, std::memory_order_acq_rel);
      if (c >= kChunks) return;
      const int64_t first = std::min(nc_, c * blocks_per_chunk_ * kScanBlock);
      const int64_t last = std::min(nc_, first + blocks_per_chunk_ * kScanBlock);
      slots_[c] = scan_range(row_cost_, row_, base_, first, last, w_, block_min);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  const int64_t nc_;
  const lap::Workspace w_;
  double* const scratch_;
  const int64_t blocks_per_chunk_;
  const T* row_cost_ = nullptr;
  int64_t row_ = 0;
  double base_ = 0.0;
  lap::Candidate slots_[kChunks];
  std::atomic<int64_t> generation_{0};
  std::atomic<int> next_{kChunks};
  std::atomic<int> done_{0};
  std::atomic<bool> stop_{false};
};

// The CPU's team for lap.h: one thread (the leader), with a vectorized scan that a
// ScanCrew may share out to helper threads.
template <typename T>
struct CpuTeam : lap::SerialTeam {
  ScanCrew<T>* crew;  // nullptr: scan alone
  double* block_min;  // scratch for scanning alone

  template <typename U>
  lap::Candidate scan(const U* row_cost, int64_t i, double u_i, double min_val, int64_t nc,
                      const lap::Workspace& w) const {
    if (crew != nullptr) return crew->scan(row_cost, i, min_val - u_i);
    return scan_range(row_cost, i, min_val - u_i, 0, nc, w, block_min);
  }
};

// Column minima and their rows, scanning the matrix row by row (contiguous reads).
// Also returns the sum of x - x over the matrix: 0 when every entry is finite, NaN
// otherwise (checked here because this pass reads the whole matrix anyway).
template <typename T>
FM_CPU_CLONES double column_minima(const T* c, int64_t n, double* v, int64_t* argmin) {
  double probe = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    v[j] = static_cast<double>(c[j]);
    argmin[j] = 0;
    probe += v[j] - v[j];
  }
  for (int64_t i = 1; i < n; ++i) {
    const T* row = c + i * n;
#pragma omp simd reduction(+ : probe)
    for (int64_t j = 0; j < n; ++j) {
      const double x = static_cast<double>(row[j]);
      const bool lower = x < v[j];
      v[j] = lower ? x : v[j];
      argmin[j] = lower ? i : argmin[j];
      probe += x - x;
    }
  }
  return probe;
}

// min over j in [begin, end) of row[j] - v[j], vectorized.
template <typename T>
double min_reduced(const T* row, const double* v, int64_t begin, int64_t end) {
  double best = INFINITY;
#pragma omp simd reduction(min : best)
  for (int64_t j = begin; j < end; ++j) {
    const double h = static_cast<double>(row[j]) - v[j];
    best = h < best ? h : best;
  }
  return best;
}

// Column reduction and reduction transfer (JV's first two phases). Afterwards every
// assigned row's column is a minimum of its reduced costs c[i][j] - v[j]. Returns false,
// changing nothing else, when an entry is not finite (then the JV start does not apply).
template <typename T>
bool column_reduction(const T* c, int64_t n, Problem<T>& p) {
  p.argmin.resize(n);
  if (column_minima(c, n, p.v.data(), p.argmin.data()) != 0.0) {
    std::fill(p.v.begin(), p.v.end(), 0.0);
    return false;
  }
  std::vector<int64_t>& matches = p.matches;
  matches.assign(n, 0);
  // Ascending, so that a row that is the minimum of several columns takes the first:
  // with the tie rule of augmenting_row_reduction this gives scipy's identity assignment
  // on a constant matrix.
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = p.argmin[j];
    if (++matches[i] == 1) {
      p.col4row[i] = j;
      p.row4col[j] = i;
    }
  }
  // A row that is the minimum of exactly one column may lower that column's v by its
  // second-best reduced cost: the row stays at its minimum and others see more slack.
  for (int64_t i = 0; i < n; ++i) {
    if (matches[i] != 1) continue;
    const int64_t j1 = p.col4row[i];
    const T* row = c + i * n;
    const double second = std::min(min_reduced(row, p.v.data(), 0, j1),
                                   min_reduced(row, p.v.data(), j1 + 1, n));
    p.v[j1] -= second;
  }
  return true;
}

// The smallest and second smallest of row[j] - v[j] over j in [0, n), n >= 2: the scan
// of each augmenting row reduction step, which dominated small and mid-sized problems
// as a scalar loop with two data-dependent branches. Here each of 8 lanes keeps its own
// two smallest, branch-free, so that it vectorizes; the lanes are merged at the end.
// (Tracking each lane's argmin as well measured slower than finding the first column at
// the minimum afterwards.)
template <typename T>
__attribute__((always_inline)) inline void two_smallest_lanes(const T* row, const double* v,
                                                              int64_t n, double& first,
                                                              double& second) {
  constexpr int kLanes = 8;
  double m1[kLanes], m2[kLanes];
  for (int l = 0; l < kLanes; ++l) m1[l] = m2[l] = INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double h = static_cast<double>(row[j + l]) - v[j + l];
      m2[l] = std::min(m2[l], std::max(m1[l], h));
      m1[l] = std::min(m1[l], h);
    }
  }
  for (int l = 0; j < n; ++j, ++l) {
    const double h = static_cast<double>(row[j]) - v[j];
    m2[l] = std::min(m2[l], std::max(m1[l], h));
    m1[l] = std::min(m1[l], h);
  }
  int best = 0;
  for (int l = 1; l < kLanes; ++l) best = m1[l] < m1[best] ? l : best;
  double runner_up = m2[best];
  for (int l = 0; l < kLanes; ++l) runner_up = l == best ? runner_up : std::min(runner_up, m1[l]);
  first = m1[best];
  second = runner_up;
}

#define FM_TWO_SMALLEST_CLONE(T)                                                  \
  FM_CPU_CLONES void two_smallest(const T* row, const double* v, int64_t n, double& first, \
                                  double& second) {                               \
    two_smallest_lanes(row, v, n, first, second);                                 \
  }
FM_TWO_SMALLEST_CLONE(float)
FM_TWO_SMALLEST_CLONE(double)
#undef FM_TWO_SMALLEST_CLONE
// From this many columns the vectorized scan is used. The scalar one, which tracks both
// columns in its single pass, wins only when the branch predictor has learned the
// matrix (the same instance solved again and again, as a benchmark loop does): on
// distinct random matrices its mispredicted branches made n = 32..128 1.3-1.5x slower.
constexpr int64_t kVectorTwoSmallest = 16;

// Augmenting row reduction (JV's third phase), one pass over the free rows: a free row
// takes its best column, pushing out the owner, and lowers that column's v by the gap
// to its second best. On random costs it assigns most rows cheaply. One pass with a
// budget of 4n row scans measured fastest here; later passes cost more than the
// augmentations they save.
template <typename T>
void augmenting_row_reduction(const T* c, int64_t n, Problem<T>& p) {
  p.free_rows.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (p.col4row[i] == -1) p.free_rows.push_back(i);
  }
  const int64_t previous = static_cast<int64_t>(p.free_rows.size());
  int64_t kept = 0;
  int64_t k = 0;
  int64_t budget = 4 * n + 64;
  while (k < previous && budget-- > 0) {
    const int64_t i = p.free_rows[k++];
    const T* row = c + i * n;
    double u1, u2;
    int64_t j1 = 0, j2 = -1;  // j2: the runner-up's column, when the scan tracks it
    if (n >= kVectorTwoSmallest) {
      two_smallest(row, p.v.data(), n, u1, u2);
      // The first column at the minimum (the scan's own subtraction: bitwise equal).
      while (static_cast<double>(row[j1]) - p.v[j1] != u1) ++j1;
    } else {  // short rows: one pass that also tracks both columns is faster
      u1 = static_cast<double>(row[0]) - p.v[0];
      u2 = INFINITY;
      for (int64_t j = 1; j < n; ++j) {
        const double h = static_cast<double>(row[j]) - p.v[j];
        if (h < u2) {
          if (h >= u1) {
            u2 = h;
            j2 = j;
          } else {
            u2 = u1;
            u1 = h;
            j2 = j1;
            j1 = j;
          }
        }
      }
    }
    int64_t i0 = p.row4col[j1];
    const bool strictly_better = u1 < u2;
    if (strictly_better) {
      p.v[j1] -= u2 - u1;
    } else if (i0 >= 0) {
      // A tie: take the first free column among the tied minima when there is one
      // (nobody is displaced; scipy's choice on ties), else the next tied column.
      int64_t free_tie = -1;
      for (int64_t j = 0; j < n; ++j) {
        if (j == j1 || static_cast<double>(row[j]) - p.v[j] != u1) continue;
        if (p.row4col[j] == -1) {
          free_tie = j;
          break;
        }
        if (j2 < 0) j2 = j;
      }
      j1 = free_tie >= 0 ? free_tie : j2;
      i0 = p.row4col[j1];
    }
    if (i0 >= 0) p.col4row[i0] = -1;
    p.col4row[i] = j1;
    p.row4col[j1] = i;
    if (i0 >= 0) {
      if (strictly_better) {
        p.free_rows[--k] = i0;  // retry the displaced row right away
      } else {
        p.free_rows[kept++] = i0;
      }
    }
  }
  while (k < previous) p.free_rows[kept++] = p.free_rows[k++];
  p.free_rows.resize(kept);
}

// Row potentials that make every reduced cost >= 0 and zero on the matching.
template <typename T>
void row_potentials(const T* c, int64_t n, Problem<T>& p) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = c + i * n;
    if (p.col4row[i] >= 0) {
      p.u[i] = static_cast<double>(row[p.col4row[i]]) - p.v[p.col4row[i]];
    } else {
      double best = INFINITY;
      for (int64_t j = 0; j < n; ++j) best = std::min(best, static_cast<double>(row[j]) - p.v[j]);
      p.u[i] = best;
    }
  }
}

// NaN and -inf are invalid entries (+inf is allowed: a forbidden pair).
template <typename T>
bool has_invalid_entry(const T* c, int64_t count) {
  // Fast path: x - x is 0 for finite x and NaN for NaN and +-inf, and the sum of those
  // vectorizes. Only a matrix with a non-finite entry takes the scalar scan.
  T probe = 0;
#pragma omp simd reduction(+ : probe)
  for (int64_t k = 0; k < count; ++k) probe += c[k] - c[k];
  if (probe == 0) return false;
  for (int64_t k = 0; k < count; ++k) {
    if (std::isnan(c[k]) || c[k] == -INFINITY) return true;
  }
  return false;
}

// The GPU kernel's code path on one thread (for the tests).
template <typename T>
int64_t assign_generic(const T* c, int64_t nr, int64_t nc, const lap::Workspace& w) {
  lap::TeamState state{};
  return lap::assign_free_rows(lap::SerialTeam{}, state, c, nr, nc, w);
}

// Assigns the free rows; a large problem solved alone shares its scans with helpers.
template <typename T>
int64_t assign(const T* c, int64_t nr, int64_t nc, const lap::Workspace& w, Problem<T>& p,
               int threads) {
  lap::TeamState state{};
  threads = std::min(threads, kMaxTeam);
  if (threads <= 1 || nc < kTeamMinColumns) {
    return lap::assign_free_rows(CpuTeam<T>{{}, nullptr, p.block_min.data()}, state, c, nr, nc,
                                 w);
  }
  ScanCrew<T> crew(nc, w, p.block_min.data());
  int64_t failed = -1;
  global_pool().run(threads, [&](int rank) {
    if (rank > 0) {
      crew.serve(rank);
      return;
    }
    failed = lap::assign_free_rows(CpuTeam<T>{{}, &crew, nullptr}, state, c, nr, nc, w);
    crew.stop();
  });
  return failed;
}

// Source element types: the stored type, the solver's type, and the widening.
template <int32_t Code>
struct Source;
#define FM_SOURCE(CODE, STORED, SOLVER, TOO_LARGE)                                    \
  template <>                                                                         \
  struct Source<CODE> {                                                               \
    using Stored = STORED;                                                            \
    using Solver = SOLVER;                                                            \
    static Solver read(Stored x) { return static_cast<Solver>(x); }                   \
    static bool too_large(Stored x) { return TOO_LARGE; }                             \
  };
// 2^53: the largest magnitude up to which double holds every integer.
constexpr int64_t kExactInt = int64_t{1} << 53;
FM_SOURCE(kCostFloat64, double, double, false)
FM_SOURCE(kCostFloat32, float, float, false)
FM_SOURCE(kCostInt8, int8_t, float, false)
FM_SOURCE(kCostInt16, int16_t, float, false)
FM_SOURCE(kCostInt32, int32_t, double, false)
FM_SOURCE(kCostInt64, int64_t, double, (x > kExactInt || x < -kExactInt))
FM_SOURCE(kCostUInt8, uint8_t, float, false)
FM_SOURCE(kCostUInt16, uint16_t, float, false)
FM_SOURCE(kCostUInt32, uint32_t, double, false)
FM_SOURCE(kCostUInt64, uint64_t, double, (x > static_cast<uint64_t>(kExactInt)))
FM_SOURCE(kCostBool, uint8_t, float, false)
#undef FM_SOURCE
template <>
struct Source<kCostFloat16> {
  using Stored = uint16_t;
  using Solver = float;
  static float read(uint16_t x) { return half_to_float(x); }
  static bool too_large(uint16_t) { return false; }
};
template <>
struct Source<kCostBFloat16> {
  using Stored = uint16_t;
  using Solver = float;
  static float read(uint16_t x) { return bfloat16_to_float(x); }
  static bool too_large(uint16_t) { return false; }
};

// One problem's costs as given: element (i, j) at data[i * sr + j * sc].
template <typename Stored>
struct View {
  const Stored* data;
  int64_t rows, cols, sr, sc;
};

// Copies a view into `out` oriented as the solver wants it (nr <= nc rows, contiguous,
// negated when maximizing). Returns false when an entry cannot be widened exactly.
template <int32_t Code, typename T = typename Source<Code>::Solver>
bool load_oriented(const View<typename Source<Code>::Stored>& in, bool transpose,
                   bool maximize, std::vector<T>& out) {
  using S = Source<Code>;
  const int64_t nr = transpose ? in.cols : in.rows;
  const int64_t nc = transpose ? in.rows : in.cols;
  out.resize(nr * nc);
  // Transposed: walk the source row by row (contiguous reads) and scatter.
  const int64_t out_r = transpose ? 1 : nc, out_c = transpose ? nc : 1;
  bool exact = true;
  for (int64_t i = 0; i < in.rows; ++i) {
    const auto* src = in.data + i * in.sr;
    T* dst = out.data() + i * out_r;
    for (int64_t j = 0; j < in.cols; ++j) {
      const auto x = src[j * in.sc];
      if constexpr (Code == kCostInt64 || Code == kCostUInt64) exact &= !S::too_large(x);
      const T y = S::read(x);
      dst[j * out_c] = maximize ? -y : y;
    }
  }
  return exact;
}

// Solves one oriented problem (c: nr x nc, nr <= nc, minimization, contiguous) and
// writes its pairs in the caller's orientation; returns a CostStatus.
template <typename T>
int32_t solve_oriented(const T* c, int64_t nr, int64_t nc, bool transpose, bool generic,
                       int threads, Problem<T>& p, int64_t* row_out, int64_t* col_out) {
  const lap::Workspace w = p.resize(nr, nc);
  // Square problems start with JV's reductions; its first pass also proves every entry
  // finite. Otherwise (or when that check fails) look for invalid entries on their own.
  const bool jv_start = !generic && nr == nc && nr > 1 && column_reduction(c, nr, p);
  if (jv_start) {
    augmenting_row_reduction(c, nr, p);
    row_potentials(c, nr, p);
  } else if (has_invalid_entry(c, nr * nc)) {
    return kInvalid;
  }
  const int64_t failed = generic ? assign_generic(c, nr, nc, w) : assign(c, nr, nc, w, p, threads);
  if (failed >= 0) return kInfeasible;
  if (!transpose) {
    for (int64_t i = 0; i < nr; ++i) {
      row_out[i] = i;
      col_out[i] = p.col4row[i];
    }
    return kSolved;
  }
  // Transposed: row4col-like inversion. col4row[k] is the original row matched to
  // original column k; report the pairs by ascending original row (a counting pass:
  // the matched rows are distinct).
  p.matches.assign(nc, -1);
  for (int64_t k = 0; k < nr; ++k) p.matches[p.col4row[k]] = k;
  for (int64_t r = 0, k = 0; r < nc; ++r) {
    if (p.matches[r] < 0) continue;
    row_out[k] = r;
    col_out[k] = p.matches[r];
    ++k;
  }
  return kSolved;
}

// Solves one problem given as a view; returns a CostStatus.
template <int32_t Code>
int32_t solve_one(const View<typename Source<Code>::Stored>& in, bool maximize, bool generic,
                  int threads, Problem<typename Source<Code>::Solver>& p, int64_t* row_out,
                  int64_t* col_out) {
  using T = typename Source<Code>::Solver;
  const bool transpose = in.rows > in.cols;
  const int64_t nr = transpose ? in.cols : in.rows;
  const int64_t nc = transpose ? in.rows : in.cols;
  const T* c;
  constexpr bool same = std::is_same_v<typename Source<Code>::Stored, T> &&
                        Code != kCostBool;  // bool is stored as uint8: never "same"
  if constexpr (same) {
    const bool direct = !transpose && !maximize && in.sc == 1 && in.sr == in.cols;
    if (direct) {
      c = in.data;
    } else {
      load_oriented<Code>(in, transpose, maximize, p.cost);
      c = p.cost.data();
    }
  } else {
    if (!load_oriented<Code>(in, transpose, maximize, p.cost)) return kStatusTooLarge;
    c = p.cost.data();
  }
  return solve_oriented(c, nr, nc, transpose, generic, threads, p, row_out, col_out);
}

// Problems up to this many entries reuse a thread's working memory across calls (a tiny
// problem otherwise spends more time allocating than solving); larger ones free theirs.
constexpr int64_t kKeepWorkspace = 1 << 16;

template <int32_t Code>
int64_t solve_batch(const void* cost, int64_t batch, int64_t rows, int64_t cols,
                    int64_t stride_b, int64_t stride_r, int64_t stride_c, bool maximize,
                    bool generic, int64_t* row_out, int64_t* col_out, int32_t* status) {
  using Stored = typename Source<Code>::Stored;
  using T = typename Source<Code>::Solver;
  const auto* data = static_cast<const Stored*>(cost);
  const int64_t pairs = std::min(rows, cols);
  const int64_t per_problem = rows * cols;
  auto view = [&](int64_t b) { return View<Stored>{data + b * stride_b, rows, cols, stride_r, stride_c}; };
  if (batch == 1) {  // one problem: the threads share its searches
    // Only a problem wide enough for a team asks for the thread count: until the pool
    // exists, that reads the CPU count from sysfs (microseconds, more than a tiny solve).
    const int threads = std::max(rows, cols) >= kTeamMinColumns ? get_num_threads() : 1;
    if (per_problem <= kKeepWorkspace) {
      thread_local Problem<T> kept;
      status[0] = solve_one<Code>(view(0), maximize, generic, threads, kept, row_out, col_out);
    } else {
      Problem<T> p;
      status[0] = solve_one<Code>(view(0), maximize, generic, threads, p, row_out, col_out);
    }
  } else {
    // Several problems: one thread each, problems weighted by size for equal work.
    std::vector<int64_t> weights(batch + 1);
    for (int64_t b = 0; b <= batch; ++b) weights[b] = b * std::max<int64_t>(per_problem, 1);
    parallel_ranges(batch, weights, 1, [&](int64_t first, int64_t last) {
      Problem<T> p;
      for (int64_t b = first; b < last; ++b) {
        status[b] = solve_one<Code>(view(b), maximize, generic, 1, p, row_out + b * pairs,
                                    col_out + b * pairs);
      }
    });
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (status[b] != kSolved) return b;
  }
  return -1;
}

}  // namespace

int64_t linear_assignment(const void* cost, int32_t type, int64_t batch, int64_t rows,
                          int64_t cols, int64_t stride_b, int64_t stride_r, int64_t stride_c,
                          bool maximize, bool generic, int64_t* row_out, int64_t* col_out,
                          int32_t* status) {
  if (batch <= 0 || rows <= 0 || cols <= 0) return -1;
#define FM_CASE(CODE)                                                                  \
  case CODE:                                                                           \
    return solve_batch<CODE>(cost, batch, rows, cols, stride_b, stride_r, stride_c,    \
                             maximize, generic, row_out, col_out, status);
  switch (type) {
    FM_CASE(kCostFloat64)
    FM_CASE(kCostFloat32)
    FM_CASE(kCostFloat16)
    FM_CASE(kCostBFloat16)
    FM_CASE(kCostInt8)
    FM_CASE(kCostInt16)
    FM_CASE(kCostInt32)
    FM_CASE(kCostInt64)
    FM_CASE(kCostUInt8)
    FM_CASE(kCostUInt16)
    FM_CASE(kCostUInt32)
    FM_CASE(kCostUInt64)
    FM_CASE(kCostBool)
    default:
      throw std::invalid_argument("linear_assignment: unknown cost type code " +
                                  std::to_string(type));
  }
#undef FM_CASE
}

}  // namespace fastmerge::cpu
