// `eep tokenize` / `eep detokenize`: text <-> ids with a model directory's tokenizer.json.
// Output is one JSON line on stdout ({"ids": [...]} / {"text": "..."}) for scripts to parse.
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "command.h"
#include "core/util.h"
#include "model/tokenizer.h"

namespace eep::cli {
namespace {

Result<std::unique_ptr<Tokenizer>> LoadModelTokenizer(const std::string& model_dir) {
  return Tokenizer::FromFile(model_dir + "/tokenizer.json");
}

std::string IdsJson(const std::vector<int64_t>& ids) {
  std::string out = "{\"ids\": [";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(ids[i]);
  }
  out += "]}";
  return out;
}

}  // namespace
}  // namespace eep::cli

EEP_REGISTER_COMMAND(
    tokenize, "tokenize", "encode text to token ids with DIR/tokenizer.json",
    [](CLI::App* app) -> std::function<int()> {
      auto model = std::make_shared<std::string>();
      auto text = std::make_shared<std::string>();
      app->add_option("--model", *model, "model directory (has tokenizer.json)")->required();
      app->add_option("--text", *text, "UTF-8 text to encode")->required();
      return [model, text]() -> int {
        auto tok = eep::cli::LoadModelTokenizer(*model);
        if (!tok.ok()) return eep::cli::Fail(tok.status());
        auto ids = (*tok)->Encode(*text);
        if (!ids.ok()) return eep::cli::Fail(ids.status());
        std::cout << eep::cli::IdsJson(*ids) << std::endl;
        return 0;
      };
    });

EEP_REGISTER_COMMAND(
    detokenize, "detokenize", "decode token ids to text with DIR/tokenizer.json",
    [](CLI::App* app) -> std::function<int()> {
      auto model = std::make_shared<std::string>();
      auto ids_text = std::make_shared<std::string>();
      app->add_option("--model", *model, "model directory (has tokenizer.json)")->required();
      app->add_option("--ids", *ids_text, "comma-separated ids, e.g. 1,2,3")->required();
      return [model, ids_text]() -> int {
        auto ids = eep::ParseIdList(*ids_text, "--ids");
        if (!ids.ok()) return eep::cli::Fail(ids.status());
        auto tok = eep::cli::LoadModelTokenizer(*model);
        if (!tok.ok()) return eep::cli::Fail(tok.status());
        auto text = (*tok)->Decode(*ids);
        if (!text.ok()) return eep::cli::Fail(text.status());
        // Decode output is valid UTF-8 (lossy), so dump() cannot throw.
        std::cout << "{\"text\": " << nlohmann::json(*text).dump() << "}" << std::endl;
        return 0;
      };
    });
