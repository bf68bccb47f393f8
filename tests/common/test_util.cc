#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace eep::test {

CommandResult RunEep(const std::string& args) {
  std::string err_file = TempDir("stderr") + "/err.txt";
  std::string cmd = std::string(EEP_BIN) + " " + args + " 2>" + err_file;
  CommandResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream e(err_file);
  std::stringstream ss;
  ss << e.rdbuf();
  r.err = ss.str();
  return r;
}

std::string TempDir(const std::string& tag) {
  std::string tmpl = "/tmp/eep-test-" + tag + "-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  char* d = mkdtemp(buf.data());
  return d ? std::string(d) : std::string("/tmp");
}

std::vector<GoldenPrompt> LoadGoldenPrompts(const std::string& model) {
  std::ifstream in(ModelDir(model) + "/golden.json");
  const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  std::vector<GoldenPrompt> out;
  if (!j.is_object() || !j.contains("prompts")) return out;
  for (const auto& p : j["prompts"])
    out.push_back({p["ids"].get<std::vector<int64_t>>(), p["greedy"].get<std::vector<int64_t>>(),
                   p["min_top2_margin"].get<double>()});
  return out;
}

MaxErr CompareMax(const std::vector<float>& got, const std::vector<float>& ref) {
  if (got.size() != ref.size()) return {INFINITY, INFINITY};
  double max_ref = 1, max_diff = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(ref[i])));
    max_diff = std::max(max_diff, std::fabs(static_cast<double>(got[i]) - ref[i]));
  }
  return {max_diff, max_diff / max_ref};
}

}  // namespace eep::test
