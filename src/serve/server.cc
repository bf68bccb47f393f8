// The HTTP front end: OpenAI-compatible endpoints over the scheduler (see serve.h).
#include <fmt/format.h>
#include <httplib.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <ctime>
#include <filesystem>
#include <map>
#include <random>

#include "core/logging.h"
#include "core/util.h"
#include "serve/internal.h"
#include "serve/serve.h"

namespace eep::serve {

void UseServeSocketOptions(httplib::Server& http) {
  // (Accepted sockets inherit the listener's options: with SO_REUSEADDR those a killed server
  // leaves behind do not block the next one's bind.)
  http.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    fcntl(sock, F_SETFD, FD_CLOEXEC);
  });
}
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::ordered_json;

// Invalid UTF-8 cannot reach here from the detokenizer, but a prompt echo or an error message
// might carry it: replace rather than throw.
std::string Dump(const Json& j) {
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::string RandomHex(size_t n) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string s;
  while (s.size() < n) s += fmt::format("{:016x}", rng());
  s.resize(n);
  return s;
}

// cpp-httplib's Server with access to its listening socket, to raise the accept backlog: the
// Debian build listens with a backlog of 5, so a burst of connections (16 clients at once) would
// otherwise see dropped SYNs and a one-second retransmit.
class HttpServer : public httplib::Server {
 public:
  int listen_fd() const { return static_cast<int>(svr_sock_.load()); }
};

const char* const kRequestStatuses[] = {"ok", "invalid", "aborted", "error", "unavailable"};

}  // namespace

class Server::Impl {
 public:
  ServerOptions opts;
  std::unique_ptr<StepEngine> engine;
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<Tokenizer> tokenizer;
  ChatTemplate chat_template;
  std::set<int64_t> special_ids;  // added tokens marked special: not shown in text by default
  std::set<int64_t> no_ids;
  ModelInfo model;
  HttpServer http;
  std::thread listen_thread;
  DisconnectWatcher watcher;
  int port = 0;
  int64_t created = 0;

  // Shutdown.
  std::mutex stop_mu;
  std::condition_variable stop_cv;
  bool stop_requested = false;
  bool abort_in_flight = false;
  bool waited = false;
  std::atomic<bool> draining{false};
  int64_t active = 0;  // requests between Submit and their last byte (guarded by stop_mu)

  // Metrics.
  std::mutex metrics_mu;
  std::map<std::string, int64_t> requests;        // by status
  std::map<std::string, int64_t> finish_reasons;  // of successful requests
  Histogram latency{{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}};
  Histogram ttft{{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}};

  // ---- helpers ---------------------------------------------------------------------------

  void CountRequest(const std::string& status) {
    std::lock_guard lk(metrics_mu);
    ++requests[status];
  }

  void SendError(httplib::Response& res, const ApiError& e, const std::string& status_label) {
    res.status = e.status;
    res.set_content(Dump(e.ToJson()), "application/json");
    CountRequest(status_label);
  }

  static ApiError ServerError(int status, std::string message) {
    ApiError e;
    e.status = status;
    e.type = status == 503 ? "service_unavailable" : "server_error";
    e.message = std::move(message);
    return e;
  }

  void BeginRequest() {
    std::lock_guard lk(stop_mu);
    ++active;
  }
  void EndRequest() {
    {
      std::lock_guard lk(stop_mu);
      --active;
    }
    stop_cv.notify_all();
  }

  // ---- one generation ----------------------------------------------------------------------

  // The HTTP side of a submitted request: turns the scheduler's tokens into text and the
  // OpenAI finish reason, and records the request's metrics once.
  class Generation {
   public:
    Generation(Impl* server, CompletionParams params, std::shared_ptr<RequestHandle> handle)
        : server_(server),
          params_(std::move(params)),
          handle_(std::move(handle)),
          detok_(server->tokenizer.get(), params_.stop,
                 params_.skip_special_tokens ? &server->special_ids : &server->no_ids),
          id_((params_.chat ? "chatcmpl-" : "cmpl-") + RandomHex(32)),
          created_(static_cast<int64_t>(std::time(nullptr))) {}

    // Waits for the next tokens; returns the text and token ids they add. Sets done() at the end.
    void Next(std::string* delta, std::vector<int64_t>* ids) {
      delta->clear();
      ids->clear();
      if (done_) return;
      RequestHandle::Progress p = handle_->Wait(cursor_);
      bool stopped = false;
      for (size_t i = 0; i < p.tokens.size() && !stopped; ++i) {
        const int64_t tok = p.tokens[i];
        ++cursor_;
        out_ids_.push_back(tok);
        ids->push_back(tok);
        const bool last = i + 1 == p.tokens.size();
        // A stop token (EOS) ends the generation without adding text.
        if (last && p.finish == FinishReason::kStop) break;
        stopped = detok_.Push(tok);
      }
      if (stopped) {
        // The stop string is matched: the sequence's remaining tokens are not needed.
        handle_->Cancel(Status::Cancelled("stop string matched"));
        finish_ = "stop";
        done_ = true;
      } else if (p.finish != FinishReason::kNone) {
        done_ = true;
        switch (p.finish) {
          case FinishReason::kStop: finish_ = "stop"; break;
          case FinishReason::kLength: finish_ = "length"; break;
          default:
            error_ = p.error.ok() ? Status::Internal("request failed") : p.error;
            failed_ = p.finish;
        }
      }
      *delta = done_ ? detok_.Finish() : detok_.TakeDelta();
    }

    bool done() const { return done_; }
    bool failed() const { return failed_ != FinishReason::kNone; }
    const std::string& text() const { return detok_.text(); }

    ApiError FailureError() const {
      if (failed_ == FinishReason::kAborted)
        return ServerError(error_.code() == StatusCode::kCancelled ? 499 : 503, error_.message());
      return ServerError(500, error_.message());
    }

    Json Usage() const {
      const int64_t p = static_cast<int64_t>(params_.prompt_ids.size());
      const int64_t c = static_cast<int64_t>(out_ids_.size());
      return Json{{"prompt_tokens", p}, {"completion_tokens", c}, {"total_tokens", p + c}};
    }

    Json Envelope(bool chunk) const {
      return Json{{"id", id_},
                  {"object", params_.chat ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                          : "text_completion"},
                  {"created", created_},
                  {"model", server_->model.served_name}};
    }

    Json Response() const {
      Json j = Envelope(false);
      Json choice{{"index", 0}};
      if (params_.chat)
        choice["message"] = Json{{"role", "assistant"}, {"content", text()}};
      else
        choice["text"] = text();
      choice["logprobs"] = nullptr;
      choice["finish_reason"] = finish_;
      if (params_.return_token_ids) {
        choice["token_ids"] = out_ids_;
        if (!params_.chat) choice["prompt_token_ids"] = params_.prompt_ids;
      }
      j["choices"] = Json::array({choice});
      if (params_.return_token_ids && params_.chat) j["prompt_token_ids"] = params_.prompt_ids;
      j["usage"] = Usage();
      return j;
    }

    // One SSE event with a delta (and the finish reason on the last one).
    std::string Chunk(const std::string& delta, const std::vector<int64_t>& ids, bool first) const {
      Json j = Envelope(true);
      Json choice{{"index", 0}};
      if (params_.chat) {
        Json d = Json::object();
        if (first) d["role"] = "assistant";
        if (!delta.empty() || first) d["content"] = delta;
        choice["delta"] = d;
      } else {
        choice["text"] = delta;
      }
      choice["logprobs"] = nullptr;
      choice["finish_reason"] = done_ && !failed() ? Json(finish_) : Json(nullptr);
      if (params_.return_token_ids) {
        choice["token_ids"] = ids;
        if (first && !params_.chat) choice["prompt_token_ids"] = params_.prompt_ids;
      }
      j["choices"] = Json::array({choice});
      if (params_.return_token_ids && params_.chat && first)
        j["prompt_token_ids"] = params_.prompt_ids;
      if (params_.include_usage) j["usage"] = nullptr;
      return "data: " + Dump(j) + "\n\n";
    }

    std::string UsageChunk() const {
      Json j = Envelope(true);
      j["choices"] = Json::array();
      j["usage"] = Usage();
      return "data: " + Dump(j) + "\n\n";
    }

    // Counts the request in /metrics (once).
    void Record(bool client_gone) {
      if (recorded_) return;
      recorded_ = true;
      std::string status = "ok";
      if (failed_ == FinishReason::kAborted)
        status = error_.code() == StatusCode::kCancelled ? "aborted" : "unavailable";
      else if (failed_ != FinishReason::kNone)
        status = "error";
      else if (client_gone || !done_)
        status = "aborted";
      const auto now = Clock::now();
      EEP_LOG_DEBUG("serve: {} {}: {} prompt + {} completion tokens, {} in {:.3f} s", id_, status,
                    params_.prompt_ids.size(), out_ids_.size(), finish_.empty() ? "-" : finish_,
                    std::chrono::duration<double>(now - handle_->arrival_time()).count());
      std::lock_guard lk(server_->metrics_mu);
      ++server_->requests[status];
      if (auto t = handle_->first_token_time())
        server_->ttft.Observe(std::chrono::duration<double>(*t - handle_->arrival_time()).count());
      if (status == "ok") {
        ++server_->finish_reasons[finish_];
        server_->latency.Observe(
            std::chrono::duration<double>(now - handle_->arrival_time()).count());
      }
    }

    RequestHandle& handle() { return *handle_; }
    const CompletionParams& params() const { return params_; }

   private:
    Impl* server_;
    CompletionParams params_;
    std::shared_ptr<RequestHandle> handle_;
    IncrementalDetokenizer detok_;
    std::string id_;
    int64_t created_;
    size_t cursor_ = 0;
    std::vector<int64_t> out_ids_;
    bool done_ = false;
    std::string finish_;
    FinishReason failed_ = FinishReason::kNone;
    Status error_;
    bool recorded_ = false;
  };

  // ---- handlers ----------------------------------------------------------------------------

  void HandleCompletion(const httplib::Request& req, httplib::Response& res, bool chat) {
    if (draining)
      return SendError(res, ServerError(503, "the server is shutting down"), "unavailable");
    nlohmann::json body;
    try {
      body = nlohmann::json::parse(req.body);
    } catch (const nlohmann::json::exception& e) {
      ApiError err;
      err.message = fmt::format("the request body is not valid JSON: {}", e.what());
      return SendError(res, err, "invalid");
    }
    CompletionParams params;
    if (auto err = ParseCompletionRequest(body, chat, model, &params))
      return SendError(res, *err, "invalid");
    GenerationRequest g;
    g.prompt_ids = params.prompt_ids;
    g.max_tokens = params.max_tokens;
    g.sampling = params.sampling;
    if (!params.ignore_eos) g.stop_token_ids = scheduler->config().eos_token_ids;
    g.stop_token_ids.insert(g.stop_token_ids.end(), params.stop_token_ids.begin(),
                            params.stop_token_ids.end());
    auto handle = scheduler->Submit(std::move(g));
    if (!handle.ok()) {
      if (handle.status().code() == StatusCode::kInvalidArgument) {
        ApiError err;
        err.message = handle.status().message();
        return SendError(res, err, "invalid");
      }
      return SendError(res, ServerError(503, handle.status().message()), "unavailable");
    }
    BeginRequest();
    auto gen = std::make_shared<Generation>(this, std::move(params), std::move(*handle));
    std::weak_ptr<Generation> weak = gen;
    const uint64_t watch = watcher.Watch(req.local_port, req.remote_addr, req.remote_port, [weak] {
      if (auto g = weak.lock()) g->handle().Cancel(Status::Cancelled("client disconnected"));
    });
    if (!gen->params().stream) {
      std::string delta;
      std::vector<int64_t> ids;
      while (!gen->done()) gen->Next(&delta, &ids);
      watcher.Unwatch(watch);
      if (gen->failed()) {
        ApiError err = gen->FailureError();
        res.status = err.status;
        res.set_content(Dump(err.ToJson()), "application/json");
      } else {
        res.set_content(Dump(gen->Response()), "application/json");
      }
      gen->Record(false);
      EndRequest();
      return;
    }
    res.set_header("Cache-Control", "no-cache");
    // Exactly "text/event-stream": cpp-httplib compresses other text/* types for clients that
    // accept gzip, which would hold tokens back in the compressor.
    res.set_chunked_content_provider(
        "text/event-stream",
        [gen](size_t /*offset*/, httplib::DataSink& sink) {
          bool first = true;
          std::string delta;
          std::vector<int64_t> ids;
          auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
          if (gen->params().chat) {
            // The role comes first, before any token, as OpenAI streams it.
            if (!write(gen->Chunk("", {}, true))) return false;
            first = false;
          }
          while (!gen->done()) {
            gen->Next(&delta, &ids);
            if (gen->failed()) break;
            if (delta.empty() && ids.empty() && !gen->done()) continue;
            if (delta.empty() && !gen->done() && !gen->params().return_token_ids) continue;
            if (!write(gen->Chunk(delta, ids, first))) {
              gen->handle().Cancel(Status::Cancelled("client disconnected"));
              return false;
            }
            first = false;
          }
          if (gen->failed()) {
            if (!write("data: " + Dump(gen->FailureError().ToJson()) + "\n\n")) return false;
          } else if (gen->params().include_usage) {
            if (!write(gen->UsageChunk())) return false;
          }
          if (!write("data: [DONE]\n\n")) return false;
          sink.done();
          return true;
        },
        [this, gen, watch](bool success) {
          watcher.Unwatch(watch);
          if (!gen->done()) gen->handle().Cancel(Status::Cancelled("client disconnected"));
          gen->Record(!success);
          EndRequest();
        });
  }

  void HandleModels(httplib::Response& res) {
    Json m{{"id", model.served_name}, {"object", "model"},
           {"created", created},      {"owned_by", "eep"},
           {"root", opts.model_dir},  {"max_model_len", model.max_model_len}};
    res.set_content(Dump(Json{{"object", "list"}, {"data", Json::array({m})}}), "application/json");
  }

  // Why the server cannot serve, or "" when it can. Dead ranks do not count: the survivors
  // serve (the engine says when they cannot, e.g. too few expert slots left).
  std::string Unhealthy(const SchedulerStats& s) const {
    if (draining) return "the server is shutting down";
    if (!s.engine_status.ok()) return "engine failed: " + s.engine_status.message();
    if (s.cluster.health != "ok") return s.cluster.health;
    return "";
  }

  // POST /scale {"ep_size": N}: accepted at once (202); the step thread starts the new ranks
  // (or drains some) and switches at a step boundary while requests keep flowing.
  void HandleScale(const httplib::Request& req, httplib::Response& res) {
    auto bad = [&](const std::string& message, const std::string& param) {
      ApiError e;
      e.message = message;
      e.param = param;
      res.status = e.status;
      res.set_content(Dump(e.ToJson()), "application/json");
    };
    Json body;
    try {
      body = Json::parse(req.body);
    } catch (const Json::exception& e) {
      return bad(fmt::format("request body is not valid JSON: {}", e.what()), "");
    }
    if (!body.is_object()) return bad("request body must be a JSON object", "");
    for (const auto& [k, v] : body.items())
      if (k != "ep_size") return bad(fmt::format("unknown field '{}' (expected ep_size)", k), k);
    if (!body.contains("ep_size") || !body["ep_size"].is_number_integer())
      return bad("'ep_size' must be an integer", "ep_size");
    const int64_t n = body["ep_size"].get<int64_t>();
    constexpr int64_t kMaxRanks = 1024;
    if (n < 1 || n > kMaxRanks) return bad(fmt::format("'ep_size' must be in [1, {}], got {}", kMaxRanks, n), "ep_size");
    const SchedulerStats s = scheduler->Stats();
    int64_t serving = 0;
    for (const auto& r : s.cluster.ranks) {
      if (r.state == "joining" || r.state == "draining") {
        ApiError e = ServerError(409, fmt::format("a scaling step to {} rank(s) is in progress", s.cluster.target_size));
        e.type = "conflict_error";
        res.status = e.status;
        return res.set_content(Dump(e.ToJson()), "application/json");
      }
      serving += r.state == "alive";
    }
    Status st = scheduler->RequestScale(static_cast<int>(n));
    if (st.code() == StatusCode::kInProgress) {
      ApiError e = ServerError(409, fmt::format("{}; see /v1/cluster", st.message()));
      e.type = "conflict_error";
      res.status = e.status;
      return res.set_content(Dump(e.ToJson()), "application/json");
    }
    if (!st.ok()) {
      ApiError e = ServerError(st.code() == StatusCode::kInvalidArgument ? 400 : 503, st.message());
      res.status = e.status;
      return res.set_content(Dump(e.ToJson()), "application/json");
    }
    res.status = 202;
    res.set_content(Dump(Json{{"status", "accepted"}, {"ep_size", n}, {"from", serving}}), "application/json");
  }

  void HandleHealth(httplib::Response& res) {
    const std::string why = Unhealthy(scheduler->Stats());
    if (why.empty()) {
      res.set_content(R"({"status":"ok"})", "application/json");
    } else {
      res.status = 503;
      res.set_content(Dump(Json{{"status", "unavailable"}, {"reason", why}}), "application/json");
    }
  }

  void HandleCluster(httplib::Response& res) {
    const SchedulerStats s = scheduler->Stats();
    Json ranks = Json::array();
    for (const auto& r : s.cluster.ranks)
      ranks.push_back(
          {{"id", r.rank}, {"pid", r.pid}, {"node", r.node}, {"state", r.state}, {"num_seqs", r.num_seqs}});
    Json events = Json::array();
    for (const auto& e : s.cluster.events)
      events.push_back({{"epoch", e.epoch},
                        {"kind", e.kind},
                        {"reason", e.reason},
                        {"dead_ranks", e.dead_ranks},
                        {"members", e.members},
                        {"detect_ms", e.detect_seconds * 1000},
                        {"abort_ms", e.abort_seconds * 1000},
                        {"plan_ms", e.plan_seconds * 1000},
                        {"restore_ms", e.restore_seconds * 1000},
                        {"blocking_ms", e.blocking_seconds * 1000},
                        {"resume_ms", e.resume_seconds * 1000},
                        {"experts", {{"peers", e.experts_from_peers}, {"backup", e.experts_from_backup}, {"disk", e.experts_from_disk}}},
                        {"bytes", {{"peers", e.bytes_from_peers}, {"backup", e.bytes_from_backup}, {"disk", e.bytes_from_disk}}},
                        {"requeued_seqs", e.requeued_seqs},
                        {"attempts", e.attempts}});
    Json j{{"epoch", s.cluster.epoch},
           {"steps", s.cluster.steps},
           {"map_version", s.cluster.map_version},
           {"health", s.cluster.health},
           {"target_size", s.cluster.target_size},
           {"scale_error", s.scale_error},
           {"backup", {{"ready", s.cluster.backup_ready}, {"health", s.cluster.backup_health}}},
           {"ranks", ranks},
           {"events", events},
           {"eplb", {{"rebalances", s.eplb.rebalances}, {"moved_experts", s.eplb.moved_experts}}},
           {"scheduler", {{"running", s.running}, {"waiting", s.waiting}, {"steps", s.steps}}}};
    res.set_content(Dump(j), "application/json");
  }

  void HandleMetrics(httplib::Response& res) {
    const SchedulerStats s = scheduler->Stats();
    std::string out;
    auto head = [&](const char* name, const char* type, const char* help) {
      out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
    };
    {
      std::lock_guard lk(metrics_mu);
      head("eep_requests_total", "counter",
           "HTTP generation requests by outcome (ok, invalid, aborted, error, unavailable)");
      for (const char* st : kRequestStatuses) {
        auto it = requests.find(st);
        AppendSample(&out, "eep_requests_total", fmt::format("status=\"{}\"", st),
                     static_cast<double>(it == requests.end() ? 0 : it->second));
      }
      head("eep_request_success_total", "counter", "Completed requests by finish reason");
      for (const char* r : {"stop", "length"}) {
        auto it = finish_reasons.find(r);
        AppendSample(&out, "eep_request_success_total", fmt::format("finish_reason=\"{}\"", r),
                     static_cast<double>(it == finish_reasons.end() ? 0 : it->second));
      }
    }
    head("eep_prompt_tokens_total", "counter", "Prompt tokens prefilled");
    AppendSample(&out, "eep_prompt_tokens_total", "", static_cast<double>(s.prompt_tokens));
    head("eep_generation_tokens_total", "counter", "Tokens generated");
    AppendSample(&out, "eep_generation_tokens_total", "", static_cast<double>(s.generation_tokens));
    latency.Render("eep_request_latency_seconds", "End-to-end latency of completed requests", &out);
    ttft.Render("eep_time_to_first_token_seconds", "Time from arrival to the first token", &out);
    head("eep_running_requests", "gauge", "Sequences in the running batch");
    AppendSample(&out, "eep_running_requests", "", static_cast<double>(s.running));
    head("eep_waiting_requests", "gauge", "Requests waiting to be scheduled");
    AppendSample(&out, "eep_waiting_requests", "", static_cast<double>(s.waiting));
    head("eep_engine_steps_total", "counter", "Engine steps run by the scheduler");
    AppendSample(&out, "eep_engine_steps_total", "", static_cast<double>(s.steps));
    head("eep_engine_up", "gauge", "1 while the engine serves, 0 after it failed");
    AppendSample(&out, "eep_engine_up", "", s.engine_status.ok() ? 1 : 0);
    head("eep_cluster_epoch", "gauge", "Membership epoch of the expert-parallel group");
    AppendSample(&out, "eep_cluster_epoch", "", static_cast<double>(s.cluster.epoch));
    head("eep_expert_map_version", "gauge",
         "Version of the expert placement (bumps per rebalance)");
    AppendSample(&out, "eep_expert_map_version", "", static_cast<double>(s.cluster.map_version));
    head("eep_rank_up", "gauge", "1 if the rank is alive");
    for (const auto& r : s.cluster.ranks)
      AppendSample(&out, "eep_rank_up", fmt::format("rank=\"{}\"", r.rank),
                   r.state == "alive" ? 1 : 0);
    head("eep_rank_state", "gauge",
         "1 for the rank's current state (alive, joining, draining, dead, left)");
    for (const auto& r : s.cluster.ranks)
      AppendSample(&out, "eep_rank_state", fmt::format("rank=\"{}\",state=\"{}\"", r.rank, r.state),
                   1);
    head("eep_rank_sequences", "gauge", "Sequences whose KV cache lives on the rank");
    for (const auto& r : s.cluster.ranks)
      AppendSample(&out, "eep_rank_sequences", fmt::format("rank=\"{}\"", r.rank),
                   static_cast<double>(r.num_seqs));
    head("eep_expert_load", "gauge",
         "Tokens routed to each logical expert over the EPLB window (layer = decoder layer index)");
    const auto moe_layers = scheduler->config().MoeLayers();
    if (s.num_experts > 0) {
      for (int64_t l = 0; l < s.num_moe_layers; ++l) {
        const int64_t layer =
            l < static_cast<int64_t>(moe_layers.size()) ? moe_layers[static_cast<size_t>(l)] : l;
        for (int64_t e = 0; e < s.num_experts; ++e) {
          const size_t i = static_cast<size_t>(l * s.num_experts + e);
          if (i >= s.expert_load.size()) break;
          AppendSample(&out, "eep_expert_load", fmt::format("layer=\"{}\",expert=\"{}\"", layer, e),
                       static_cast<double>(s.expert_load[i]));
        }
      }
    }
    {
      // Membership changes: failovers and scaling steps, with where restored experts came from.
      std::map<std::string, int64_t> count, experts, bytes;
      std::map<std::string, double> blocking;
      for (const auto& e : s.cluster.events) {
        ++count[e.kind];
        blocking[e.kind] += e.blocking_seconds;
        experts["peers"] += e.experts_from_peers;
        experts["backup"] += e.experts_from_backup;
        experts["disk"] += e.experts_from_disk;
        bytes["peers"] += e.bytes_from_peers;
        bytes["backup"] += e.bytes_from_backup;
        bytes["disk"] += e.bytes_from_disk;
      }
      head("eep_recoveries_total", "counter", "Rank failures recovered (failovers)");
      AppendSample(&out, "eep_recoveries_total", "", static_cast<double>(count["failover"]));
      head("eep_scaling_events_total", "counter", "Scaling steps completed, by direction");
      for (const char* d : {"up", "down"})
        AppendSample(&out, "eep_scaling_events_total", fmt::format("direction=\"{}\"", d),
                     static_cast<double>(count[std::string("scale-") + d]));
      head("eep_membership_blocking_seconds_total", "counter",
           "Time no step could run because of a membership change, by kind");
      for (const char* k : {"failover", "scale-up", "scale-down"})
        AppendSample(&out, "eep_membership_blocking_seconds_total", fmt::format("kind=\"{}\"", k), blocking[k]);
      head("eep_restored_experts_total", "counter",
           "Experts moved by membership changes, by source (peers, backup = DRAM mirror, disk = checkpoint)");
      for (const char* src : {"peers", "backup", "disk"})
        AppendSample(&out, "eep_restored_experts_total", fmt::format("source=\"{}\"", src),
                     static_cast<double>(experts[src]));
      head("eep_restore_bytes_total", "counter", "Bytes of expert weights moved by membership changes, by source");
      for (const char* src : {"peers", "backup", "disk"})
        AppendSample(&out, "eep_restore_bytes_total", fmt::format("source=\"{}\"", src), static_cast<double>(bytes[src]));
      head("eep_restore_seconds_total", "counter", "Time spent restoring experts in membership changes");
      double restore = 0;
      for (const auto& e : s.cluster.events) restore += e.restore_seconds;
      AppendSample(&out, "eep_restore_seconds_total", "", restore);
      head("eep_backup_ready", "gauge", "1 when every rank reached the DRAM backup managers");
      AppendSample(&out, "eep_backup_ready", "", s.cluster.backup_ready ? 1 : 0);
    }
    head("eep_eplb_rebalances_total", "counter", "Expert rebalances applied");
    AppendSample(&out, "eep_eplb_rebalances_total", "", static_cast<double>(s.eplb.rebalances));
    head("eep_eplb_moved_experts_total", "counter", "Experts moved by rebalances");
    AppendSample(&out, "eep_eplb_moved_experts_total", "",
                 static_cast<double>(s.eplb.moved_experts));
    res.set_content(out, "text/plain; version=0.0.4; charset=utf-8");
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  Status Start() {
    EEP_RETURN_IF_ERROR(ValidateSchedulerOptions(opts.scheduler));
    EEP_ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromFile(opts.model_dir + "/tokenizer.json"));
    EEP_ASSIGN_OR_RETURN(chat_template, ChatTemplate::Load(opts.model_dir));
    // Special added tokens are left out of the text (skip_special_tokens, as transformers'
    // decode does by default).
    EEP_ASSIGN_OR_RETURN(auto tj, ReadJsonFile(opts.model_dir + "/tokenizer.json"));
    if (tj.contains("added_tokens") && tj["added_tokens"].is_array())
      for (const auto& t : tj["added_tokens"])
        if (t.is_object() && t.value("special", false) && t.contains("id") &&
            t["id"].is_number_integer())
          special_ids.insert(t["id"].get<int64_t>());
    if (opts.served_model_name.empty())
      opts.served_model_name =
          std::filesystem::path(opts.model_dir).lexically_normal().filename().string();
    if (opts.served_model_name.empty())
      opts.served_model_name = std::filesystem::path(opts.model_dir)
                                   .lexically_normal()
                                   .parent_path()
                                   .filename()
                                   .string();
    const ModelConfig& cfg = engine->config();
    model.tokenizer = tokenizer.get();
    model.chat_template = &chat_template;
    model.served_name = opts.served_model_name;
    model.vocab_size = cfg.vocab_size;
    model.max_model_len = cfg.max_position_embeddings;
    created = static_cast<int64_t>(std::time(nullptr));

    scheduler = std::make_unique<Scheduler>(engine.get(), opts.scheduler);
    EEP_RETURN_IF_ERROR(scheduler->Start());
    EEP_RETURN_IF_ERROR(watcher.Start());

    // cpp-httplib as packaged writes without MSG_NOSIGNAL: a client that hangs up must not
    // kill the server with SIGPIPE.
    signal(SIGPIPE, SIG_IGN);
    const int threads = opts.http_threads > 0
                            ? opts.http_threads
                            : static_cast<int>(2 * opts.scheduler.max_num_seqs + 16);
    http.new_task_queue = [threads] {
      return new httplib::ThreadPool(static_cast<size_t>(threads));
    };
    http.set_payload_max_length(64 << 20);
    http.set_exception_handler(
        [this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
          std::string what = "unknown exception";
          try {
            if (ep) std::rethrow_exception(ep);
          } catch (const std::exception& e) {
            what = e.what();
          } catch (...) {
          }
          EEP_LOG_ERROR("serve: handler failed: {}", what);
          res.status = 500;
          res.set_content(Dump(ServerError(500, what).ToJson()), "application/json");
        });
    http.set_error_handler(httplib::Server::HandlerWithResponse(
        [](const httplib::Request& req, httplib::Response& res) {
          if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
          ApiError e;
          e.status = res.status;
          e.message = res.status == 404 ? fmt::format("no route for {} {}", req.method, req.path)
                                        : fmt::format("HTTP {}", res.status);
          e.type = res.status == 404 ? "not_found_error" : "invalid_request_error";
          res.set_content(Dump(e.ToJson()), "application/json");
          return httplib::Server::HandlerResponse::Handled;
        }));
    http.Post("/v1/completions", [this](const httplib::Request& q, httplib::Response& r) {
      HandleCompletion(q, r, false);
    });
    http.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r) {
      HandleCompletion(q, r, true);
    });
    http.Get("/v1/models",
             [this](const httplib::Request&, httplib::Response& r) { HandleModels(r); });
    http.Get("/health", [this](const httplib::Request&, httplib::Response& r) { HandleHealth(r); });
    http.Get("/metrics",
             [this](const httplib::Request&, httplib::Response& r) { HandleMetrics(r); });
    http.Post("/scale", [this](const httplib::Request& q, httplib::Response& r) { HandleScale(q, r); });
    http.Get("/v1/cluster",
             [this](const httplib::Request&, httplib::Response& r) { HandleCluster(r); });

    UseServeSocketOptions(http);
    if (opts.port == 0) {
      port = http.bind_to_any_port(opts.host);
      if (port <= 0)
        return Status::IOError(fmt::format("cannot listen on {} (any port)", opts.host));
    } else {
      if (!http.bind_to_port(opts.host, opts.port))
        return Status::IOError(
            fmt::format("cannot listen on {}:{} (in use, or not an address of this host)",
                        opts.host, opts.port));
      port = opts.port;
    }
    if (::listen(http.listen_fd(), SOMAXCONN) != 0)
      EEP_LOG_WARN("serve: cannot raise the listen backlog");
    listen_thread = std::thread([this] {
      if (!http.listen_after_bind() && !draining)
        EEP_LOG_ERROR("serve: the HTTP listener stopped unexpectedly");
    });
    EEP_LOG_INFO(
        "serve: model '{}' ({}), chat template: {}; max_num_seqs {}, max_num_batched_tokens {}",
        opts.served_model_name, opts.model_dir, chat_template.description(),
        opts.scheduler.max_num_seqs, opts.scheduler.max_num_batched_tokens);
    return Status::Ok();
  }

  void RequestStop(bool abort) {
    {
      std::lock_guard lk(stop_mu);
      stop_requested = true;
      abort_in_flight = abort_in_flight || abort;
    }
    draining = true;
    stop_cv.notify_all();
  }

  Status Wait() {
    std::unique_lock lk(stop_mu);
    stop_cv.wait(lk, [&] { return stop_requested; });
    if (waited) return Status::Ok();
    waited = true;
    // Drain: requests already admitted may finish (new ones get 503 since `draining`).
    const auto deadline =
        Clock::now() + std::chrono::duration_cast<Clock::duration>(
                           std::chrono::duration<double>(std::max(0.0, opts.shutdown_timeout_s)));
    if (active > 0)
      EEP_LOG_INFO("serve: shutting down; waiting for {} request(s) in flight", active);
    if (!stop_cv.wait_until(lk, deadline, [&] { return active == 0 || abort_in_flight; }))
      EEP_LOG_WARN("serve: {} request(s) still in flight after {} s; cancelling them", active,
                   opts.shutdown_timeout_s);
    lk.unlock();
    // Cancels whatever is left; their handlers answer and finish.
    scheduler->Stop(Status::Unavailable("the server is shutting down"));
    lk.lock();
    stop_cv.wait(lk, [&] { return active == 0; });
    lk.unlock();
    http.stop();
    if (listen_thread.joinable()) listen_thread.join();
    watcher.Stop();
    const Status engine_status = scheduler->Stats().engine_status;
    engine->Shutdown();
    EEP_LOG_INFO("serve: stopped");
    return engine_status;
  }
};

Result<std::unique_ptr<Server>> Server::Start(ServerOptions options,
                                              std::unique_ptr<StepEngine> engine) {
  auto impl = std::make_unique<Impl>();
  impl->opts = std::move(options);
  impl->engine = std::move(engine);
  Status st = impl->Start();
  if (!st.ok()) {
    if (impl->listen_thread.joinable()) {
      impl->http.stop();
      impl->listen_thread.join();
    }
    impl->watcher.Stop();
    if (impl->scheduler) impl->scheduler->Stop();
    impl->engine->Shutdown();
    return st;
  }
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() {
  if (impl_) {
    RequestStop(true);
    (void)Wait();
  }
}
const std::string& Server::host() const {
  return impl_->opts.host;
}
int Server::port() const {
  return impl_->port;
}
void Server::RequestStop(bool abort_in_flight) {
  impl_->RequestStop(abort_in_flight);
}
Status Server::Wait() {
  return impl_->Wait();
}
Status Server::Stop() {
  RequestStop(false);
  return Wait();
}

}  // namespace eep::serve
