// Prometheus text exposition helpers.
#include <fmt/format.h>

#include <cmath>

#include "serve/internal.h"

namespace eep::serve {
namespace {

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return fmt::format("{}", static_cast<int64_t>(v));
  return fmt::format("{}", v);
}

}  // namespace

void AppendSample(std::string* out, const std::string& name, const std::string& labels,
                  double value) {
  out->append(name);
  if (!labels.empty()) out->append("{").append(labels).append("}");
  out->append(" ").append(FormatValue(value)).append("\n");
}

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double v) {
  std::lock_guard lk(mu_);
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::Render(const std::string& name, const std::string& help, std::string* out) const {
  std::lock_guard lk(mu_);
  out->append(fmt::format("# HELP {} {}\n# TYPE {} histogram\n", name, help, name));
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    AppendSample(out, name + "_bucket", fmt::format("le=\"{}\"", FormatValue(bounds_[i])),
                 static_cast<double>(cum));
  }
  cum += counts_.back();
  AppendSample(out, name + "_bucket", "le=\"+Inf\"", static_cast<double>(cum));
  AppendSample(out, name + "_sum", "", sum_);
  AppendSample(out, name + "_count", "", static_cast<double>(count_));
}

}  // namespace eep::serve
