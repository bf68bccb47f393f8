// Private parts of the serving front end, shared by src/serve/*.cc and the serve tests:
// incremental detokenization with stop strings, the chat template, OpenAI request parsing,
// metrics and client-disconnect detection.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/status.h"
#include "model/sampling.h"
#include "model/tokenizer.h"

namespace eep::serve {

// ---------------------------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------------------------

// Turns generated tokens into text as they arrive, for streaming. Guarantees that the deltas
// it hands out concatenate to exactly the final text:
//  - a token that ends inside a UTF-8 character (byte-level BPE splits characters) is held
//    back until the character completes (its decode ends in U+FFFD until then);
//  - text that could be the start of a stop string is held back until it is known not to be;
//  - on a stop string the text is cut before it and nothing more is accepted.
// Hidden ids (special tokens, ids past the tokenizer's vocabulary) add no text.
class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(const Tokenizer* tokenizer, std::vector<std::string> stop,
                         const std::set<int64_t>* hidden_ids);
  // Adds one generated token. Returns true if it completed a stop string.
  bool Push(int64_t token);
  bool stopped() const { return stopped_; }
  // Text that is final and not yet handed out.
  std::string TakeDelta();
  // At the end of generation: the rest, including anything held back.
  std::string Finish();
  // All text so far (final once Finish was called).
  const std::string& text() const { return text_; }

 private:
  void SearchStops();
  size_t HeldBack() const;

  const Tokenizer* tok_;
  std::vector<std::string> stop_;
  const std::set<int64_t>* hidden_;
  size_t max_stop_ = 0;
  std::vector<int64_t> pending_ids_;  // since the last clean UTF-8 boundary
  std::string committed_;             // text of the ids before pending_ids_
  std::string text_;                  // committed_ + the complete part of pending text
  size_t emitted_ = 0;
  size_t searched_ = 0;
  bool stopped_ = false;
  bool finished_ = false;
};

struct ChatMessage {
  std::string role;
  std::string content;
};

// ChatML, the format of Qwen and the tokenizer family of the test models:
//   <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
// Used when tokenizer_config.json's chat_template is ChatML-style (contains <|im_start|>) and as
// the default when there is no template; another template style is reported and ChatML used.
class ChatTemplate {
 public:
  // Reads MODEL_DIR/tokenizer_config.json if present.
  static Result<ChatTemplate> Load(const std::string& model_dir);
  std::string Render(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;
  const std::string& description() const { return description_; }

 private:
  std::string description_ = "default ChatML";
};

// ---------------------------------------------------------------------------------------------
// OpenAI requests
// ---------------------------------------------------------------------------------------------

struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // "" -> null
  std::string code;   // "" -> null
  nlohmann::ordered_json ToJson() const;
};

// What parsing needs to know about the model.
struct ModelInfo {
  const Tokenizer* tokenizer = nullptr;
  const ChatTemplate* chat_template = nullptr;
  std::string served_name;
  int64_t vocab_size = 0;     // the model's (embedding rows)
  int64_t max_model_len = 0;  // max_position_embeddings
};

struct CompletionParams {
  bool chat = false;
  std::vector<int64_t> prompt_ids;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<std::string> stop;
  std::vector<int64_t> stop_token_ids;  // besides EOS
  bool ignore_eos = false;
  bool skip_special_tokens = true;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool return_token_ids = false;
};

// Validates a /v1/completions (chat = false) or /v1/chat/completions body. Unknown fields are
// ignored; known ones of the wrong type or out of range give an ApiError naming the field.
std::optional<ApiError> ParseCompletionRequest(const nlohmann::json& body, bool chat,
                                               const ModelInfo& model, CompletionParams* out);

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

// Cumulative-bucket histogram in the Prometheus sense.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  // "# TYPE" block; `name` without suffixes.
  void Render(const std::string& name, const std::string& help, std::string* out) const;

 private:
  mutable std::mutex mu_;
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

// Appends "name{labels} value\n" with Prometheus number formatting.
void AppendSample(std::string* out, const std::string& name, const std::string& labels,
                  double value);

// ---------------------------------------------------------------------------------------------
// Client disconnects
// ---------------------------------------------------------------------------------------------

// Calls back when the peer of a connection closes it (EPOLLRDHUP), from one watcher thread.
// cpp-httplib 0.11 gives handlers no socket, so the connection is found by its addresses.
class DisconnectWatcher {
 public:
  DisconnectWatcher() = default;
  ~DisconnectWatcher();
  Status Start();
  void Stop();
  // Watches the TCP connection local_port <-> remote_addr:remote_port. Returns a key for
  // Unwatch, or 0 if the connection was not found (then nothing is watched). The callback runs
  // on the watcher thread at most once, and never after Unwatch returned.
  uint64_t Watch(int local_port, const std::string& remote_addr, int remote_port,
                 std::function<void()> on_disconnect);
  void Unwatch(uint64_t key);

 private:
  void Loop();
  struct Entry {
    int fd;
    std::function<void()> callback;
  };
  int epoll_fd_ = -1;
  int stop_fd_ = -1;  // eventfd
  std::thread thread_;
  std::mutex mu_;
  std::unordered_map<uint64_t, Entry> entries_;
  uint64_t next_key_ = 1;
};

// The fd of this process's TCP socket with the given local port and peer, or -1.
int FindConnectionFd(int local_port, const std::string& remote_addr, int remote_port);

}  // namespace eep::serve
