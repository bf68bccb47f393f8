// Minimal-move rebalancing. Balancedness only depends on the maximum live-GPU load (the mean
// is fixed by the weights), so each layer gets a load ceiling derived from the fresh plan's
// balancedness and the tolerance, and a greedy local search changes as few slots of the old
// placement as it can until no GPU is above the ceiling. Per layer, the fresh plan renumbered
// to best overlap the old placement is the fallback and the competitor.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "eplb/eplb.h"
#include "eplb/internal.h"

namespace eep::eplb {
namespace {

// Balancedness of one layer row, computed exactly like LayerBalancedness (same order of
// operations), so that the acceptance check here agrees with what is reported.
double RowBalancedness(const float* w, const int32_t* row, int32_t E,
                       const std::vector<int32_t>& live_gpus, int32_t per_gpu,
                       std::vector<int32_t>* cnt) {
  cnt->assign(E, 0);
  for (int32_t g : live_gpus) {
    for (int32_t k = 0; k < per_gpu; ++k) {
      const int32_t e = row[g * per_gpu + k];
      if (e >= 0) ++(*cnt)[e];
    }
  }
  double sum = 0, max = 0;
  for (int32_t g : live_gpus) {
    double load = 0;
    for (int32_t k = 0; k < per_gpu; ++k) {
      const int32_t e = row[g * per_gpu + k];
      if (e >= 0) load += static_cast<double>(w[e]) / (*cnt)[e];
    }
    sum += load;
    max = std::max(max, load);
  }
  if (max <= 0 || live_gpus.empty()) return 1.0;
  return sum / static_cast<double>(live_gpus.size()) / max;
}

// Maximum-weight perfect matching on an n x n matrix (Hungarian algorithm with potentials,
// O(n^3)); returns match[row] = column.
std::vector<int32_t> MaxWeightMatching(const std::vector<int32_t>& weight, int32_t n) {
  const double kInf = std::numeric_limits<double>::infinity();
  std::vector<double> u(n + 1, 0), v(n + 1, 0), minv(n + 1);
  std::vector<int32_t> p(n + 1, 0), way(n + 1, 0);
  std::vector<char> used(n + 1);
  for (int32_t i = 1; i <= n; ++i) {
    p[0] = i;
    int32_t j0 = 0;
    std::fill(minv.begin(), minv.end(), kInf);
    std::fill(used.begin(), used.end(), 0);
    do {
      used[j0] = 1;
      const int32_t i0 = p[j0];
      double delta = kInf;
      int32_t j1 = 0;
      for (int32_t j = 1; j <= n; ++j) {
        if (used[j]) continue;
        const double cur = -static_cast<double>(weight[(i0 - 1) * n + (j - 1)]) - u[i0] - v[j];
        if (cur < minv[j]) {
          minv[j] = cur;
          way[j] = j0;
        }
        if (minv[j] < delta) {
          delta = minv[j];
          j1 = j;
        }
      }
      for (int32_t j = 0; j <= n; ++j) {
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const int32_t j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int32_t> match(n, 0);
  for (int32_t j = 1; j <= n; ++j) {
    if (p[j] > 0) match[p[j] - 1] = j - 1;
  }
  return match;
}

// The fresh row with its live GPUs renumbered (and slots reordered within each GPU) to keep as
// many slots of `orig` as possible. Loads per GPU are unchanged, so balancedness is too.
void AlignToOld(const int32_t* fresh, const int32_t* orig, const std::vector<int32_t>& live_gpus,
                int32_t per_gpu, int32_t R, int32_t* out) {
  const int32_t n = static_cast<int32_t>(live_gpus.size());
  std::copy(fresh, fresh + R, out);
  if (n == 0) return;
  // overlap[i][j]: experts that fresh GPU live_gpus[i] shares with old GPU live_gpus[j].
  std::vector<int32_t> overlap(static_cast<size_t>(n) * n, 0);
  std::vector<char> taken(per_gpu);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t* f = fresh + live_gpus[i] * per_gpu;
    for (int32_t j = 0; j < n; ++j) {
      const int32_t* o = orig + live_gpus[j] * per_gpu;
      std::fill(taken.begin(), taken.end(), 0);
      int32_t common = 0;
      for (int32_t a = 0; a < per_gpu; ++a) {
        if (f[a] < 0) continue;
        for (int32_t b = 0; b < per_gpu; ++b) {
          if (!taken[b] && o[b] == f[a]) {
            taken[b] = 1;
            ++common;
            break;
          }
        }
      }
      overlap[static_cast<size_t>(i) * n + j] = common;
    }
  }
  const std::vector<int32_t> match = MaxWeightMatching(overlap, n);
  std::vector<char> placed(per_gpu);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t* f = fresh + live_gpus[i] * per_gpu;
    const int32_t dst_base = live_gpus[match[i]] * per_gpu;
    const int32_t* o = orig + dst_base;
    int32_t* dst = out + dst_base;
    std::fill(dst, dst + per_gpu, -2);
    std::fill(placed.begin(), placed.end(), 0);
    // Experts already in a slot of the destination GPU stay in that slot.
    for (int32_t a = 0; a < per_gpu; ++a) {
      for (int32_t b = 0; b < per_gpu; ++b) {
        if (dst[b] == -2 && o[b] == f[a] && f[a] >= 0) {
          dst[b] = f[a];
          placed[a] = 1;
          break;
        }
      }
    }
    int32_t b = 0;
    for (int32_t a = 0; a < per_gpu; ++a) {
      if (placed[a]) continue;
      while (dst[b] != -2) ++b;
      dst[b] = f[a];
    }
  }
}

// Greedy local search on one layer. Moves: replace the expert of one slot (which changes
// replica counts, so it also shifts load on the GPUs of both experts' other replicas) and swap
// two slots. The potential is the total excess of GPU loads over the ceiling; each step takes
// the move with the best excess reduction per moved slot.
class LayerSearch {
 public:
  LayerSearch(int32_t E, int32_t R, int32_t num_gpus, int32_t per_gpu,
              const std::vector<char>& gpu_live, const std::vector<int32_t>& live_gpus)
      : E_(E),
        R_(R),
        P_(num_gpus),
        per_gpu_(per_gpu),
        gpu_live_(gpu_live),
        live_gpus_(live_gpus),
        w_(E),
        cur_(R),
        orig_(R),
        cnt_(E),
        reps_(E),
        load_(num_gpus),
        delta_(num_gpus, 0.0),
        mark_(num_gpus, 0) {}

  // Writes the new row to `out`; returns false if the search got stuck above the ceiling.
  bool Run(const float* w, const int32_t* orig, double ceiling, int32_t* out) {
    ceiling_ = ceiling;
    for (int32_t e = 0; e < E_; ++e) {
      w_[e] = w[e];
      reps_[e].clear();
    }
    std::fill(cnt_.begin(), cnt_.end(), 0);
    for (int32_t s = 0; s < R_; ++s) {
      orig_[s] = orig[s];
      cur_[s] = gpu_live_[Gpu(s)] ? orig[s] : -1;
      if (cur_[s] >= 0) {
        ++cnt_[cur_[s]];
        reps_[cur_[s]].push_back(s);
      }
    }
    for (int32_t g : live_gpus_) RecomputeLoad(g);

    if (!Cover()) return false;
    FillEmpty();
    const int32_t max_steps = 4 * R_ + 16;
    for (int32_t step = 0; step < max_steps; ++step) {
      int32_t top = live_gpus_[0];
      for (int32_t g : live_gpus_) {
        if (load_[g] > load_[top]) top = g;
      }
      if (load_[top] <= ceiling_) break;
      if (!Improve(top)) return false;
    }
    for (int32_t g : live_gpus_) {
      if (load_[g] > ceiling_) return false;
    }
    RevertUnneeded();
    std::copy(cur_.begin(), cur_.end(), out);
    return true;
  }

 private:
  struct Move {
    int32_t s = -1, t = -1;  // replace: slot s gets expert b; swap: slots s and t (b = -2)
    int32_t b = -1;
    double score = 0, dsq = 0;
    bool valid = false;
  };

  int32_t Gpu(int32_t s) const { return s / per_gpu_; }
  double Share(int32_t e, int32_t c) const { return e < 0 || c <= 0 ? 0.0 : w_[e] / c; }

  void RecomputeLoad(int32_t g) {
    double load = 0;
    for (int32_t k = 0; k < per_gpu_; ++k) {
      const int32_t e = cur_[g * per_gpu_ + k];
      if (e >= 0) load += w_[e] / cnt_[e];
    }
    load_[g] = load;
  }

  void AddDelta(int32_t g, double d) {
    if (!mark_[g]) {
      mark_[g] = 1;
      touched_.push_back(g);
    }
    delta_[g] += d;
  }

  // Sums the change of total excess and of the sum of squared loads over touched GPUs, and
  // clears the scratch.
  void Collect(double* dphi, double* dsq) {
    double phi = 0, sq = 0;
    for (int32_t g : touched_) {
      const double before = load_[g], after = before + delta_[g];
      phi += std::max(0.0, after - ceiling_) - std::max(0.0, before - ceiling_);
      sq += after * after - before * before;
      delta_[g] = 0;
      mark_[g] = 0;
    }
    touched_.clear();
    *dphi = phi;
    *dsq = sq;
  }

  bool CanReplace(int32_t s, int32_t b) const {
    const int32_t a = cur_[s];
    return a != b && (a < 0 || cnt_[a] >= 2) && gpu_live_[Gpu(s)];
  }

  void DeltaReplace(int32_t s, int32_t b) {
    const int32_t a = cur_[s], g = Gpu(s);
    if (a >= 0) {
      const int32_t ca = cnt_[a];
      const double up = Share(a, ca - 1) - Share(a, ca);
      for (int32_t t : reps_[a]) {
        if (t != s) AddDelta(Gpu(t), up);
      }
      AddDelta(g, -Share(a, ca));
    }
    if (b >= 0) {
      const int32_t cb = cnt_[b];
      const double down = Share(b, cb + 1) - Share(b, cb);
      for (int32_t t : reps_[b]) AddDelta(Gpu(t), down);
      AddDelta(g, Share(b, cb + 1));
    }
  }

  void DeltaSwap(int32_t s, int32_t t) {
    const int32_t a = cur_[s], b = cur_[t];
    const double d = Share(b, b < 0 ? 0 : cnt_[b]) - Share(a, a < 0 ? 0 : cnt_[a]);
    AddDelta(Gpu(s), d);
    AddDelta(Gpu(t), -d);
  }

  int32_t Cost(int32_t s, int32_t v) const {
    return static_cast<int32_t>(v != orig_[s]) - static_cast<int32_t>(cur_[s] != orig_[s]);
  }

  void SetSlot(int32_t s, int32_t v) {
    const int32_t a = cur_[s];
    if (a == v) return;
    if (a >= 0) {
      --cnt_[a];
      auto& r = reps_[a];
      r.erase(std::find(r.begin(), r.end(), s));
    }
    if (v >= 0) {
      ++cnt_[v];
      reps_[v].push_back(s);
    }
    cur_[s] = v;
  }

  // Applies a replacement and recomputes the loads it touched exactly (no drift).
  void ApplyReplace(int32_t s, int32_t b) {
    affected_.clear();
    affected_.push_back(Gpu(s));
    const int32_t a = cur_[s];
    if (a >= 0) {
      for (int32_t t : reps_[a]) affected_.push_back(Gpu(t));
    }
    if (b >= 0) {
      for (int32_t t : reps_[b]) affected_.push_back(Gpu(t));
    }
    SetSlot(s, b);
    for (int32_t g : affected_) RecomputeLoad(g);
  }

  void ApplySwap(int32_t s, int32_t t) {
    const int32_t a = cur_[s], b = cur_[t];
    // Both experts keep their counts; set through -1 so the replica lists stay consistent.
    SetSlot(s, -1);
    SetSlot(t, a);
    SetSlot(s, b);
    RecomputeLoad(Gpu(s));
    RecomputeLoad(Gpu(t));
  }

  // Every logical expert needs a live replica: place each missing one (heaviest first) where
  // it raises the excess least, taking an empty slot or a spare replica of another expert.
  bool Cover() {
    std::vector<int32_t> missing;
    for (int32_t e = 0; e < E_; ++e) {
      if (cnt_[e] == 0) missing.push_back(e);
    }
    std::stable_sort(missing.begin(), missing.end(),
                     [&](int32_t a, int32_t b) { return w_[a] > w_[b]; });
    for (int32_t m : missing) {
      Move best;
      for (int32_t g : live_gpus_) {
        for (int32_t k = 0; k < per_gpu_; ++k) {
          const int32_t s = g * per_gpu_ + k;
          if (!CanReplace(s, m)) continue;
          DeltaReplace(s, m);
          double dphi, dsq;
          Collect(&dphi, &dsq);
          if (!best.valid || dphi < best.score || (dphi == best.score && dsq < best.dsq)) {
            best = {s, -1, m, dphi, dsq, true};
          }
        }
      }
      if (!best.valid) return false;
      ApplyReplace(best.s, m);
    }
    return true;
  }

  // A live slot left empty (its GPU came back) gets the expert that helps balance most.
  void FillEmpty() {
    for (int32_t g : live_gpus_) {
      for (int32_t k = 0; k < per_gpu_; ++k) {
        const int32_t s = g * per_gpu_ + k;
        if (cur_[s] >= 0) continue;
        Move best;
        for (int32_t b = 0; b < E_; ++b) {
          DeltaReplace(s, b);
          double dphi, dsq;
          Collect(&dphi, &dsq);
          if (!best.valid || dphi < best.score || (dphi == best.score && dsq < best.dsq)) {
            best = {s, -1, b, dphi, dsq, true};
          }
        }
        if (best.valid) ApplyReplace(s, best.b);
      }
    }
  }

  void Consider(Move* best, int32_t s, int32_t t, int32_t b, int32_t cost) {
    double dphi, dsq;
    Collect(&dphi, &dsq);
    const double gain = -dphi;
    if (!(gain > 1e-12 * ceiling_)) return;
    // Gain per moved slot; reverting a slot to its old expert counts as nearly free.
    const double score = gain / std::max(0.5, static_cast<double>(cost));
    if (!best->valid || score > best->score || (score == best->score && dsq < best->dsq)) {
      *best = {s, t, b, score, dsq, true};
    }
  }

  // One step of the search: the best move that lowers the excess of the most loaded GPU `top`
  // without pushing more excess elsewhere.
  bool Improve(int32_t top) {
    Move best;
    const int32_t base = top * per_gpu_;
    for (int32_t k = 0; k < per_gpu_; ++k) {
      const int32_t s = base + k;
      const int32_t a = cur_[s];
      // Give slot s to another expert (a loses a replica).
      if (a < 0 || cnt_[a] >= 2) {
        const double out_share = Share(a, a < 0 ? 0 : cnt_[a]);
        for (int32_t b = 0; b < E_; ++b) {
          // Only moves that lighten `top` are worth evaluating.
          if (b == a || Share(b, cnt_[b] + 1) >= out_share) continue;
          DeltaReplace(s, b);
          Consider(&best, s, -1, b, Cost(s, b));
        }
      }
      if (a < 0) continue;
      bool seen = false;  // the same expert twice on `top` needs the loops below only once
      for (int32_t j = 0; j < k; ++j) seen |= cur_[base + j] == a;
      for (int32_t g : live_gpus_) {
        if (g == top) continue;
        for (int32_t kk = 0; kk < per_gpu_; ++kk) {
          const int32_t t = g * per_gpu_ + kk;
          const int32_t x = cur_[t];
          if (x == a) continue;
          // Give a slot elsewhere to a (a gains a replica, x loses one).
          if (!seen && (x < 0 || cnt_[x] >= 2)) {
            DeltaReplace(t, a);
            Consider(&best, t, -1, a, Cost(t, a));
          }
          // Swap slot s with slot t, if that lightens `top`.
          if (Share(x, x < 0 ? 0 : cnt_[x]) >= Share(a, cnt_[a])) continue;
          DeltaSwap(s, t);
          Consider(&best, s, t, -2, Cost(s, x) + Cost(t, a));
        }
      }
    }
    if (!best.valid) return false;
    if (best.b == -2) {
      ApplySwap(best.s, best.t);
    } else {
      ApplyReplace(best.s, best.b);
    }
    return true;
  }

  // Undoes changes that later steps made unnecessary: a changed slot goes back to its old
  // expert when that keeps every GPU under the ceiling.
  void RevertUnneeded() {
    for (bool changed = true; changed;) {
      changed = false;
      for (int32_t s = 0; s < R_; ++s) {
        const int32_t o = orig_[s];
        if (cur_[s] == o || o < 0 || !CanReplace(s, o)) continue;
        DeltaReplace(s, o);
        bool ok = true;
        for (int32_t g : touched_) ok &= load_[g] + delta_[g] <= ceiling_;
        double dphi, dsq;
        Collect(&dphi, &dsq);
        if (ok) {
          ApplyReplace(s, o);
          changed = true;
        }
      }
      // Two changed slots that hold each other's old experts swap back.
      for (int32_t s = 0; s < R_; ++s) {
        if (cur_[s] == orig_[s] || orig_[s] < 0 || !gpu_live_[Gpu(s)]) continue;
        for (int32_t t : reps_[orig_[s]]) {
          if (t == s || cur_[t] == orig_[t] || orig_[t] != cur_[s] || Gpu(t) == Gpu(s)) continue;
          DeltaSwap(s, t);
          bool ok = true;
          for (int32_t g : touched_) ok &= load_[g] + delta_[g] <= ceiling_;
          double dphi, dsq;
          Collect(&dphi, &dsq);
          if (ok) {
            ApplySwap(s, t);
            changed = true;
            break;
          }
        }
      }
    }
  }

  const int32_t E_, R_, P_, per_gpu_;
  const std::vector<char>& gpu_live_;
  const std::vector<int32_t>& live_gpus_;
  std::vector<double> w_;
  std::vector<int32_t> cur_, orig_, cnt_;
  std::vector<std::vector<int32_t>> reps_;
  std::vector<double> load_, delta_;
  std::vector<char> mark_;
  std::vector<int32_t> touched_, affected_;
  double ceiling_ = 0;
};

}  // namespace

Result<MinMoveResult> RebalanceMinMove(const LoadMatrix& weight, const Topology& topo,
                                       std::span<const int32_t> old_phy2log,
                                       const MinMoveOptions& options) {
  EEP_RETURN_IF_ERROR(ValidateTopology(weight, topo));
  const int32_t L = weight.num_layers, E = weight.num_experts, R = topo.num_replicas;
  if (old_phy2log.size() != static_cast<size_t>(L) * R) {
    return Status::InvalidArgument("old_phy2log: expected " + std::to_string(L) + " x " +
                                   std::to_string(R) + " entries, got " +
                                   std::to_string(old_phy2log.size()));
  }
  for (size_t i = 0; i < old_phy2log.size(); ++i) {
    if (old_phy2log[i] < -1 || old_phy2log[i] >= E) {
      return Status::InvalidArgument("old_phy2log[" + std::to_string(i / R) + "][" +
                                     std::to_string(i % R) + "]: expert out of range");
    }
  }
  if (!(options.tolerance >= 0 && options.tolerance < 1)) {
    return Status::InvalidArgument("tolerance: must be in [0, 1)");
  }

  MinMoveResult result;
  EEP_ASSIGN_OR_RETURN(result.fresh, RebalanceExperts(weight, topo));
  EEP_ASSIGN_OR_RETURN(std::vector<double> fresh_b, LayerBalancedness(weight, topo, result.fresh));

  const internal::LiveView live = internal::MakeLiveView(topo);
  const int32_t per_gpu = topo.slots_per_gpu();
  LayerSearch search(E, R, topo.num_gpus, per_gpu, live.gpu_live, live.live_gpus);
  std::vector<int32_t> phy2log(static_cast<size_t>(L) * R);
  std::vector<int32_t> searched(R), aligned(R), cnt;
  for (int32_t l = 0; l < L; ++l) {
    const float* w = weight.values.data() + static_cast<size_t>(l) * E;
    const int32_t* orig = old_phy2log.data() + static_cast<size_t>(l) * R;
    const int32_t* fresh = result.fresh.phy2log.data() + static_cast<size_t>(l) * R;
    const double target = fresh_b[l] * (1.0 - options.tolerance);
    double total = 0;
    for (int32_t e = 0; e < E; ++e) total += w[e];
    const double mean = total / static_cast<double>(live.live_gpus.size());
    // A hair under the exact ceiling so that rounding in the final check cannot fail it.
    const double ceiling = target > 0 ? mean / target * (1.0 - 1e-9) : 0.0;

    const int32_t* choice = fresh;
    int64_t best_moves =
        CountMovedExperts({orig, static_cast<size_t>(R)}, {fresh, static_cast<size_t>(R)});
    AlignToOld(fresh, orig, live.live_gpus, per_gpu, R, aligned.data());
    const int64_t aligned_moves = CountMovedExperts({orig, static_cast<size_t>(R)}, aligned);
    if (aligned_moves < best_moves &&
        RowBalancedness(w, aligned.data(), E, live.live_gpus, per_gpu, &cnt) >= target) {
      choice = aligned.data();
      best_moves = aligned_moves;
    }
    if (search.Run(w, orig, ceiling, searched.data())) {
      const int64_t moves = CountMovedExperts({orig, static_cast<size_t>(R)}, searched);
      if (moves < best_moves &&
          RowBalancedness(w, searched.data(), E, live.live_gpus, per_gpu, &cnt) >= target) {
        choice = searched.data();
        best_moves = moves;
      }
    }
    std::copy(choice, choice + R, phy2log.begin() + static_cast<ptrdiff_t>(l) * R);
  }

  EEP_ASSIGN_OR_RETURN(result.plan, PlacementFromPhy2Log(L, E, R, std::move(phy2log)));
  EEP_ASSIGN_OR_RETURN(result.balancedness, Balancedness(weight, topo, result.plan));
  EEP_ASSIGN_OR_RETURN(result.fresh_balancedness, Balancedness(weight, topo, result.fresh));
  result.moved_experts = CountMovedExperts(old_phy2log, result.plan.phy2log);
  result.fresh_moved_experts = CountMovedExperts(old_phy2log, result.fresh.phy2log);
  return result;
}

}  // namespace eep::eplb
