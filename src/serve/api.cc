// OpenAI request validation: /v1/completions and /v1/chat/completions bodies to CompletionParams.
#include <fmt/format.h>

#include <cmath>
#include <random>

#include "serve/internal.h"

namespace eep::serve {

nlohmann::ordered_json ApiError::ToJson() const {
  nlohmann::ordered_json e{
      {"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
  if (!param.empty()) e["param"] = param;
  if (!code.empty()) e["code"] = code;
  return nlohmann::ordered_json{{"error", e}};
}

namespace {

ApiError Invalid(std::string param, std::string message) {
  ApiError e;
  e.param = std::move(param);
  e.message = std::move(message);
  return e;
}

// Typed access to optional fields: absent and null both mean "not given" (as OpenAI treats them).
class Fields {
 public:
  explicit Fields(const nlohmann::json& body) : body_(body) {}

  const nlohmann::json* Get(const char* key) const {
    auto it = body_.find(key);
    if (it == body_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  std::optional<ApiError> Bool(const char* key, bool* out) const {
    const auto* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_boolean()) return Invalid(key, fmt::format("'{}' must be a boolean", key));
    *out = v->get<bool>();
    return std::nullopt;
  }
  std::optional<ApiError> Int(const char* key, std::optional<int64_t>* out) const {
    const auto* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number_integer()) return Invalid(key, fmt::format("'{}' must be an integer", key));
    *out = v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
               ? INT64_MAX
               : v->get<int64_t>();
    return std::nullopt;
  }
  std::optional<ApiError> Number(const char* key, std::optional<double>* out) const {
    const auto* v = Get(key);
    if (v == nullptr) return std::nullopt;
    if (!v->is_number()) return Invalid(key, fmt::format("'{}' must be a number", key));
    *out = v->get<double>();
    return std::nullopt;
  }

 private:
  const nlohmann::json& body_;
};

#define EEP_API_CHECK(expr)                      \
  do {                                           \
    if (auto eep_err_ = (expr)) return eep_err_; \
  } while (0)

std::optional<ApiError> ParseIds(const nlohmann::json& arr, const char* param, const ModelInfo& m,
                                 std::vector<int64_t>* out) {
  out->clear();
  for (const auto& v : arr) {
    if (!v.is_number_integer())
      return Invalid(param,
                     fmt::format("'{}' must be a string or a list of token ids (integers)", param));
    const int64_t id =
        v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
            ? INT64_MAX
            : v.get<int64_t>();
    if (id < 0 || id >= m.vocab_size)
      return Invalid(param,
                     fmt::format("token id {} is out of the vocabulary [0, {})", id, m.vocab_size));
    out->push_back(id);
  }
  return std::nullopt;
}

std::optional<ApiError> Encode(const std::string& text, const char* param, const ModelInfo& m,
                               std::vector<int64_t>* out) {
  auto ids = m.tokenizer->Encode(text);
  if (!ids.ok())
    return Invalid(param,
                   fmt::format("'{}' cannot be tokenized: {}", param, ids.status().message()));
  *out = std::move(*ids);
  return std::nullopt;
}

std::optional<ApiError> ParsePrompt(const nlohmann::json* p, const ModelInfo& m,
                                    std::vector<int64_t>* out) {
  if (p == nullptr) return Invalid("prompt", "'prompt' is required");
  if (p->is_string()) return Encode(p->get<std::string>(), "prompt", m, out);
  if (!p->is_array())
    return Invalid("prompt", "'prompt' must be a string or a list of token ids (integers)");
  if (p->empty()) return Invalid("prompt", "'prompt' is empty");
  const auto& first = (*p)[0];
  if (first.is_string() || first.is_array()) {
    // The batched forms: a list of strings or a list of token-id lists.
    if (p->size() != 1)
      return Invalid("prompt", "batched prompts are not supported: send one prompt per request");
    if (first.is_string()) return Encode(first.get<std::string>(), "prompt", m, out);
    return ParseIds(first, "prompt", m, out);
  }
  return ParseIds(*p, "prompt", m, out);
}

std::optional<ApiError> ParseMessages(const nlohmann::json* msgs, const ModelInfo& m,
                                      std::vector<int64_t>* out) {
  if (msgs == nullptr) return Invalid("messages", "'messages' is required");
  if (!msgs->is_array() || msgs->empty())
    return Invalid("messages", "'messages' must be a non-empty list");
  std::vector<ChatMessage> chat;
  for (size_t i = 0; i < msgs->size(); ++i) {
    const auto& msg = (*msgs)[i];
    if (!msg.is_object())
      return Invalid("messages", fmt::format("messages[{}] must be an object", i));
    auto role = msg.find("role");
    if (role == msg.end() || !role->is_string())
      return Invalid("messages", fmt::format("messages[{}].role must be a string", i));
    ChatMessage cm;
    cm.role = role->get<std::string>();
    auto content = msg.find("content");
    if (content == msg.end() || content->is_null()) {
      // Allowed for assistant turns (tool calls); contributes no text.
    } else if (content->is_string()) {
      cm.content = content->get<std::string>();
    } else if (content->is_array()) {
      for (const auto& part : *content) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string())
          return Invalid(
              "messages",
              fmt::format("messages[{}].content: only parts of type \"text\" are supported", i));
        cm.content += part["text"].get<std::string>();
      }
    } else {
      return Invalid("messages",
                     fmt::format("messages[{}].content must be a string or a list of parts", i));
    }
    chat.push_back(std::move(cm));
  }
  // The template's special tokens (<|im_start|>...) are meant as tokens, which Encode gives
  // for added tokens written in the text.
  return Encode(m.chat_template->Render(chat, true), "messages", m, out);
}

std::optional<ApiError> ParseStop(const nlohmann::json* s, std::vector<std::string>* out) {
  if (s == nullptr) return std::nullopt;
  if (s->is_string()) {
    out->push_back(s->get<std::string>());
    return std::nullopt;
  }
  if (!s->is_array()) return Invalid("stop", "'stop' must be a string or a list of strings");
  for (const auto& v : *s) {
    if (!v.is_string()) return Invalid("stop", "'stop' must be a string or a list of strings");
    out->push_back(v.get<std::string>());
  }
  return std::nullopt;
}

}  // namespace

std::optional<ApiError> ParseCompletionRequest(const nlohmann::json& body, bool chat,
                                               const ModelInfo& m, CompletionParams* out) {
  if (!body.is_object()) return Invalid("", "the request body must be a JSON object");
  Fields f(body);
  CompletionParams p;
  p.chat = chat;

  if (const auto* model = f.Get("model")) {
    if (!model->is_string()) return Invalid("model", "'model' must be a string");
    if (model->get<std::string>() != m.served_name) {
      ApiError e =
          Invalid("model", fmt::format("The model `{}` does not exist; this server serves `{}`.",
                                       model->get<std::string>(), m.served_name));
      e.status = 404;
      e.code = "model_not_found";
      return e;
    }
  }

  // Features this server does not have are refused rather than silently ignored.
  std::optional<int64_t> n;
  EEP_API_CHECK(f.Int("n", &n));
  if (n && *n != 1) return Invalid("n", "only n = 1 is supported");
  std::optional<int64_t> best_of;
  EEP_API_CHECK(f.Int("best_of", &best_of));
  if (best_of && *best_of != 1) return Invalid("best_of", "only best_of = 1 is supported");
  bool echo = false;
  EEP_API_CHECK(f.Bool("echo", &echo));
  if (echo) return Invalid("echo", "echo is not supported");
  if (const auto* lp = f.Get("logprobs")) {
    if (chat ? !(lp->is_boolean() && !lp->get<bool>())
             : !(lp->is_number_integer() && lp->get<int64_t>() == 0))
      return Invalid("logprobs", "logprobs are not supported");
  }
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    std::optional<double> v;
    EEP_API_CHECK(f.Number(key, &v));
    if (v && *v != 0) return Invalid(key, fmt::format("'{}' is not supported (only 0)", key));
  }
  std::optional<double> rep;
  EEP_API_CHECK(f.Number("repetition_penalty", &rep));
  if (rep && *rep != 1)
    return Invalid("repetition_penalty", "'repetition_penalty' is not supported (only 1)");
  if (const auto* tools = f.Get("tools");
      tools != nullptr && !(tools->is_array() && tools->empty()))
    return Invalid("tools", "tools are not supported");

  // Prompt.
  if (chat) {
    EEP_API_CHECK(ParseMessages(f.Get("messages"), m, &p.prompt_ids));
  } else {
    EEP_API_CHECK(ParsePrompt(f.Get("prompt"), m, &p.prompt_ids));
  }
  const char* prompt_param = chat ? "messages" : "prompt";
  const int64_t n_prompt = static_cast<int64_t>(p.prompt_ids.size());
  if (n_prompt == 0) return Invalid(prompt_param, "the prompt is empty (no tokens)");
  if (m.max_model_len > 0 && n_prompt >= m.max_model_len)
    return Invalid(
        prompt_param,
        fmt::format("the prompt has {} tokens; this model's maximum context length is {} "
                    "tokens, which must also hold at least one generated token",
                    n_prompt, m.max_model_len));

  // Length.
  std::optional<int64_t> max_tokens;
  const char* max_tokens_param = "max_tokens";
  EEP_API_CHECK(f.Int("max_tokens", &max_tokens));
  if (chat && !max_tokens) {
    EEP_API_CHECK(f.Int("max_completion_tokens", &max_tokens));
    if (max_tokens) max_tokens_param = "max_completion_tokens";
  }
  const int64_t room = m.max_model_len > 0 ? m.max_model_len - n_prompt : INT64_MAX;
  if (max_tokens) {
    if (*max_tokens < 1)
      return Invalid(max_tokens_param,
                     fmt::format("'{}' must be at least 1, got {}", max_tokens_param, *max_tokens));
    if (*max_tokens > room)
      return Invalid(
          max_tokens_param,
          fmt::format(
              "this model's maximum context length is {} tokens; the prompt has {} and {} were "
              "requested for the completion ({} at most)",
              m.max_model_len, n_prompt, *max_tokens, room));
    p.max_tokens = *max_tokens;
  } else {
    // OpenAI's defaults: 16 for completions, up to the context for chat.
    p.max_tokens = chat ? room : std::min<int64_t>(16, room);
  }

  // Sampling.
  std::optional<double> temperature, top_p;
  std::optional<int64_t> top_k, seed;
  EEP_API_CHECK(f.Number("temperature", &temperature));
  EEP_API_CHECK(f.Number("top_p", &top_p));
  EEP_API_CHECK(f.Int("top_k", &top_k));
  EEP_API_CHECK(f.Int("seed", &seed));
  // OpenAI's default temperature is 1.
  p.sampling.temperature = temperature.value_or(1.0);
  if (p.sampling.temperature < 0 || !std::isfinite(p.sampling.temperature))
    return Invalid("temperature",
                   fmt::format("'temperature' must be >= 0, got {}", p.sampling.temperature));
  p.sampling.top_p = top_p.value_or(1.0);
  if (!(p.sampling.top_p > 0 && p.sampling.top_p <= 1))
    return Invalid("top_p", fmt::format("'top_p' must be in (0, 1], got {}", p.sampling.top_p));
  if (top_k && *top_k < -1)
    return Invalid("top_k",
                   fmt::format("'top_k' must be -1 (off), 0 (off) or positive, got {}", *top_k));
  p.sampling.top_k = top_k && *top_k > 0 ? *top_k : 0;
  if (seed) {
    p.sampling.seed = static_cast<uint64_t>(*seed);
  } else {
    static thread_local std::mt19937_64 rng{std::random_device{}()};
    p.sampling.seed = rng();
  }
  if (Status st = ValidateSamplingParams(p.sampling); !st.ok()) return Invalid("", st.message());

  // Stopping.
  EEP_API_CHECK(ParseStop(f.Get("stop"), &p.stop));
  if (const auto* ids = f.Get("stop_token_ids")) {
    if (!ids->is_array())
      return Invalid("stop_token_ids", "'stop_token_ids' must be a list of token ids");
    EEP_API_CHECK(ParseIds(*ids, "stop_token_ids", m, &p.stop_token_ids));
  }
  EEP_API_CHECK(f.Bool("ignore_eos", &p.ignore_eos));
  EEP_API_CHECK(f.Bool("skip_special_tokens", &p.skip_special_tokens));

  // Output shape.
  EEP_API_CHECK(f.Bool("stream", &p.stream));
  if (const auto* so = f.Get("stream_options")) {
    if (!so->is_object()) return Invalid("stream_options", "'stream_options' must be an object");
    if (auto it = so->find("include_usage"); it != so->end() && !it->is_null()) {
      if (!it->is_boolean())
        return Invalid("stream_options", "'stream_options.include_usage' must be a boolean");
      p.include_usage = it->get<bool>();
    }
  }
  EEP_API_CHECK(f.Bool("return_token_ids", &p.return_token_ids));
  if (const auto* user = f.Get("user"); user != nullptr && !user->is_string())
    return Invalid("user", "'user' must be a string");

  *out = std::move(p);
  return std::nullopt;
}

}  // namespace eep::serve
