// Exact linear assignment (min-cost matching of the nr rows of an nr x nc cost matrix,
// nr <= nc), shared by host and device code.
//
// The core is the shortest augmenting path method (Jonker & Volgenant 1987; the
// rectangular form of Crouse 2016 that scipy uses): for each free row, a Dijkstra
// search over reduced costs c[i][j] - u[i] - v[j] finds the cheapest augmenting path,
// then the duals are updated and the path is flipped. The search is written against a
// "team": one thread on the CPU (SerialTeam), a whole CUDA block on the GPU (each
// thread scans a strided slice of the columns and the team reduces to the best one).
// The CPU tests run this exact code with SerialTeam, so the GPU logic is exercised
// without a GPU.
//
// +inf costs mark forbidden pairs: they are never on a path, and a row whose every
// reachable column is forbidden makes the problem infeasible (kInfeasible).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastmerge/moments.h"  // FM_HD

namespace fastmerge::lap {

constexpr int64_t kNoSink = -1;
constexpr int64_t kInfeasible = -2;

// Per-problem working arrays (sizes in brackets). Assignment state lives in col4row and
// row4col (-1 = unassigned); u and v are the dual potentials.
struct Workspace {
  double* u;               // [nr]
  double* v;               // [nc]
  double* shortest;        // [nc] shortest path cost to each column in this search
  int64_t* path;           // [nc] predecessor row of each column on the path tree
  int64_t* col4row;        // [nr]
  int64_t* row4col;        // [nc]
  uint8_t* visited_row;    // [nr]
  // [nc] 0 for a column still open in this search, +inf once settled: adding it to a
  // distance closes the column without a branch (so CPU scans vectorize).
  double* closed_col;
};

// Scalars the whole team reads (CUDA shared memory on the GPU).
struct TeamState {
  double min_val;
  int64_t sink;
  int64_t row;
};

// A column candidate of one Dijkstra step: its tentative distance, the column, and
// whether it is free (a free column ends the search).
struct Candidate {
  double value;
  int64_t position;  // the column; -1 for "no candidate"
  bool free_column;
};

// Strict order on candidates: cheaper first, then free columns (ending the search
// early), then the lower position (deterministic).
FM_HD bool better(const Candidate& a, const Candidate& b) {
  if (a.value != b.value) return a.value < b.value;
  if (a.free_column != b.free_column) return a.free_column;
  return a.position < b.position;
}

// One Dijkstra step's scan over the unsettled columns, generic over the team: relax the
// distances through row i (at distance min_val) and return the team's best candidate.
template <class Team, typename T>
FM_HD Candidate scan_columns(const Team& team, const T* row_cost, int64_t i, double u_i,
                             double min_val, int64_t nc, const Workspace& w) {
  Candidate best{INFINITY, -1, false};
  for (int64_t j = team.begin(nc); j < team.end(nc); j += team.stride()) {
    if (w.closed_col[j] != 0.0) continue;
    const double r = min_val + static_cast<double>(row_cost[j]) - u_i - w.v[j];
    if (r < w.shortest[j]) {
      w.path[j] = i;
      w.shortest[j] = r;
    }
    const Candidate c{w.shortest[j], j, w.row4col[j] == -1};
    if (best.position < 0 || better(c, best)) best = c;
  }
  return team.best(best);
}

// The team of one CPU thread; its scan is the generic one (the CPU solver has a faster,
// vectorized team of its own, csrc/cpu/linear_assignment.cpp).
// A team splits every loop over rows or columns with begin(n), end(n) and stride():
// a CUDA block interleaves its threads (coalesced), CPU threads take contiguous ranges.
struct SerialTeam {
  FM_HD int64_t begin(int64_t) const { return 0; }
  FM_HD int64_t end(int64_t n) const { return n; }
  FM_HD int64_t stride() const { return 1; }
  FM_HD bool leader() const { return true; }
  FM_HD void sync() const {}
  FM_HD Candidate best(const Candidate& c) const { return c; }
  template <typename T>
  FM_HD Candidate scan(const T* row_cost, int64_t i, double u_i, double min_val, int64_t nc,
                       const Workspace& w) const {
    return scan_columns(*this, row_cost, i, u_i, min_val, nc, w);
  }
};

// Dijkstra search from `start_row` over costs of type T (float or double; distances
// are always double, and float -> double is exact). Returns the free column that ends the cheapest
// augmenting path, or kInfeasible. Leaves the path tree in w.path, distances in
// w.shortest, visited marks, and the path length in state.min_val.
template <class Team, typename T>
FM_HD int64_t augmenting_path(const Team& team, TeamState& state, const T* cost,
                              int64_t nr, int64_t nc, const Workspace& w, int64_t start_row) {
  for (int64_t j = team.begin(nc); j < team.end(nc); j += team.stride()) {
    w.closed_col[j] = 0.0;
    w.shortest[j] = INFINITY;
  }
  for (int64_t i = team.begin(nr); i < team.end(nr); i += team.stride()) w.visited_row[i] = 0;
  if (team.leader()) {
    state.min_val = 0.0;
    state.sink = kNoSink;
    state.row = start_row;
  }
  team.sync();
  for (;;) {
    const int64_t i = state.row;
    const Candidate best = team.scan(cost + i * nc, i, w.u[i], state.min_val, nc, w);
    if (team.leader()) {
      w.visited_row[i] = 1;
      if (best.position < 0 || !(best.value < INFINITY)) {
        state.sink = kInfeasible;
      } else {
        const int64_t j = best.position;
        state.min_val = best.value;
        if (w.row4col[j] == -1) {
          state.sink = j;
        } else {
          state.row = w.row4col[j];
        }
        w.closed_col[j] = INFINITY;
      }
    }
    team.sync();
    if (state.sink != kNoSink) return state.sink;
  }
}

// Assign `row` (free) by one augmentation; returns false when it cannot be assigned.
template <class Team, typename T>
FM_HD bool assign_row(const Team& team, TeamState& state, const T* cost, int64_t nr,
                      int64_t nc, const Workspace& w, int64_t row) {
  const int64_t sink = augmenting_path(team, state, cost, nr, nc, w, row);
  if (sink < 0) return false;
  const double min_val = state.min_val;
  // Dual update keeps reduced costs >= 0 and 0 on the matching (complementary slackness).
  for (int64_t i = team.begin(nr); i < team.end(nr); i += team.stride()) {
    if (w.visited_row[i] && i != row) w.u[i] += min_val - w.shortest[w.col4row[i]];
  }
  for (int64_t j = team.begin(nc); j < team.end(nc); j += team.stride()) {
    if (w.closed_col[j] != 0.0) w.v[j] -= min_val - w.shortest[j];
  }
  team.sync();
  if (team.leader()) {
    w.u[row] += min_val;
    int64_t j = sink;
    for (;;) {  // flip the path: every row on it moves to the next column
      const int64_t i = w.path[j];
      w.row4col[j] = i;
      const int64_t previous = w.col4row[i];
      w.col4row[i] = j;
      j = previous;
      if (i == row) break;
    }
  }
  team.sync();
  return true;
}

// Solve from the current duals and partial matching, assigning every free row in order.
// Returns the first row that cannot be assigned, or -1 when all rows are assigned.
template <class Team, typename T>
FM_HD int64_t assign_free_rows(const Team& team, TeamState& state, const T* cost,
                               int64_t nr, int64_t nc, const Workspace& w) {
  for (int64_t row = 0; row < nr; ++row) {
    if (w.col4row[row] != -1) continue;
    if (!assign_row(team, state, cost, nr, nc, w, row)) return row;
  }
  return -1;
}

// Start state of a problem with nothing assigned and zero duals (the GPU's start).
template <class Team>
FM_HD void reset(const Team& team, int64_t nr, int64_t nc, const Workspace& w) {
  for (int64_t i = team.begin(nr); i < team.end(nr); i += team.stride()) {
    w.u[i] = 0.0;
    w.col4row[i] = -1;
  }
  for (int64_t j = team.begin(nc); j < team.end(nc); j += team.stride()) {
    w.v[j] = 0.0;
    w.row4col[j] = -1;
  }
  team.sync();
}

}  // namespace fastmerge::lap
