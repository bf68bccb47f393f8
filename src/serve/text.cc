// Incremental detokenization with stop strings, and the chat template.
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>

#include "core/logging.h"
#include "core/util.h"
#include "serve/internal.h"

namespace eep::serve {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer* tokenizer,
                                               std::vector<std::string> stop,
                                               const std::set<int64_t>* hidden_ids)
    : tok_(tokenizer), hidden_(hidden_ids) {
  for (auto& s : stop)
    if (!s.empty()) stop_.push_back(std::move(s));
  for (const auto& s : stop_) max_stop_ = std::max(max_stop_, s.size());
}

bool IncrementalDetokenizer::Push(int64_t token) {
  if (stopped_ || finished_) return false;
  if (token < 0 || token >= tok_->vocab_size()) return false;
  if (hidden_ != nullptr && hidden_->count(token) > 0) return false;
  pending_ids_.push_back(token);
  auto tail = tok_->Decode(pending_ids_);
  if (!tail.ok()) {  // cannot happen for ids inside the vocabulary; keep going without it
    EEP_LOG_WARN("serve: cannot decode token {}: {}", token, tail.status().ToString());
    pending_ids_.pop_back();
    return false;
  }
  std::string_view t = *tail;
  if (EndsWith(t, kReplacement)) {
    // Possibly a character cut by a token boundary: only the part before it is final.
    while (EndsWith(t, kReplacement)) t.remove_suffix(kReplacement.size());
    text_ = committed_;
    text_.append(t);
  } else {
    committed_.append(t);
    pending_ids_.clear();
    text_ = committed_;
  }
  SearchStops();
  return stopped_;
}

void IncrementalDetokenizer::SearchStops() {
  if (stop_.empty()) return;
  // A match not found before must end in the new text.
  const size_t from = searched_ + 1 > max_stop_ ? searched_ + 1 - max_stop_ : 0;
  size_t best = std::string::npos;
  for (const auto& s : stop_) {
    const size_t p = text_.find(s, from);
    if (p != std::string::npos && p < best) best = p;
  }
  searched_ = text_.size();
  if (best != std::string::npos) {
    text_.resize(best);
    stopped_ = true;
  }
}

size_t IncrementalDetokenizer::HeldBack() const {
  // The longest end of the text that is a proper prefix of a stop string.
  size_t held = 0;
  for (const auto& s : stop_) {
    for (size_t k = std::min(s.size() - 1, text_.size()); k > held; --k) {
      if (std::string_view(text_).substr(text_.size() - k) == std::string_view(s).substr(0, k)) {
        held = k;
        break;
      }
    }
  }
  return held;
}

std::string IncrementalDetokenizer::TakeDelta() {
  size_t limit = text_.size();
  if (!stopped_ && !finished_) limit -= HeldBack();
  // Never split a UTF-8 character between two deltas (each delta becomes a JSON string).
  while (limit > emitted_ && limit < text_.size() &&
         (static_cast<unsigned char>(text_[limit]) & 0xC0) == 0x80)
    --limit;
  if (limit <= emitted_) return "";
  std::string delta = text_.substr(emitted_, limit - emitted_);
  emitted_ = limit;
  return delta;
}

std::string IncrementalDetokenizer::Finish() {
  if (!finished_ && !stopped_ && !pending_ids_.empty()) {
    // Whatever is still incomplete is final now, replacement characters and all.
    auto tail = tok_->Decode(pending_ids_);
    if (tail.ok()) {
      text_ = committed_ + *tail;
      SearchStops();
    }
  }
  finished_ = true;
  return TakeDelta();
}

// ---------------------------------------------------------------------------------------------

Result<ChatTemplate> ChatTemplate::Load(const std::string& model_dir) {
  ChatTemplate t;
  const std::string path = model_dir + "/tokenizer_config.json";
  if (!std::filesystem::exists(path)) return t;
  EEP_ASSIGN_OR_RETURN(auto j, ReadJsonFile(path));
  if (!j.is_object() || !j.contains("chat_template") || j["chat_template"].is_null()) return t;
  std::string source;
  const auto& ct = j["chat_template"];
  if (ct.is_string()) {
    source = ct.get<std::string>();
  } else if (ct.is_array()) {  // [{"name": "default", "template": "..."}, ...]
    for (const auto& e : ct)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
          e["template"].is_string())
        source = e["template"].get<std::string>();
  }
  if (source.empty()) {
    return Status::InvalidArgument(
        path + ": chat_template: expected a string or a list with a \"default\" entry");
  }
  if (source.find("<|im_start|>") != std::string::npos) {
    t.description_ = "ChatML (" + path + ")";
  } else {
    t.description_ = "default ChatML (" + path +
                     " has a chat_template that is not ChatML-style; it is not used)";
    EEP_LOG_WARN("serve: {}", t.description_);
  }
  return t;
}

std::string ChatTemplate::Render(const std::vector<ChatMessage>& messages,
                                 bool add_generation_prompt) const {
  std::string out;
  for (const auto& m : messages)
    out += fmt::format("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace eep::serve
