// eep serve: the OpenAI-compatible HTTP server over the expert-parallel engine.
#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include <httplib.h>

#include "command.h"
#include "backup/sidecar.h"
#include "cluster/etcd.h"
#include "core/logging.h"
#include "core/util.h"
#include "cuda/cuda_model.h"
#include "ep/node.h"
#include "ep_flags.h"
#include "serve/serve.h"

namespace {

struct ServeCliOptions {
  eep::serve::ServerOptions server;
  eep::cli::EpFlags ep;
  std::string backend = "auto";        // where every rank computes: auto | cpu | cuda
  std::string expert_backup = "auto";  // on | off | auto (on when --ep > 1)
  std::string backup_transport = "shm";
  // Many hosts (src/ep/node.h): etcd control plane, ranks on `eep node` hosts.
  std::string coordinator;             // etcd://HOST:PORT[,...]; empty: this host only
  std::string cluster = "default";
  bool standby = false;
  int64_t lease_ttl_s = 2;
  int64_t wait_nodes_s = 120;
};

std::atomic<bool> g_stopping{false};  // a stop signal arrived (ends a standby's wait)

// Self-pipe of the stop signals: the handler only writes the signal number.
int g_signal_pipe[2] = {-1, -1};

extern "C" void OnStopSignal(int sig) {
  const char c = static_cast<char>(sig);
  const int saved = errno;
  (void)!write(g_signal_pipe[1], &c, 1);
  errno = saved;
}

// Binds host:port once (as the server will, with SO_REUSEADDR) and lets it go again.
eep::Status CheckPortFree(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || res == nullptr)
    return eep::Status::InvalidArgument(fmt::format("--host: cannot resolve '{}'", host));
  const int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  int one = 1;
  bool ok = fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) == 0 &&
            bind(fd, res->ai_addr, res->ai_addrlen) == 0;
  const int err = errno;
  if (fd >= 0) close(fd);
  freeaddrinfo(res);
  if (!ok)
    return eep::Status::IOError(
        fmt::format("cannot listen on {}:{}: {}", host, port, std::strerror(err)));
  return eep::Status::Ok();
}

// Many hosts: win the leader key (or stand by until the active coordinator dies), find the
// node agents and their backup managers, and take over the running ranks if there are any.
eep::Status SetUpCluster(const ServeCliOptions& o, eep::ep::EpOptions* ep, std::unique_ptr<eep::cluster::EtcdClient>* etcd,
                         std::unique_ptr<eep::cluster::LeaseKeeper>* lease) {
  EEP_ASSIGN_OR_RETURN(*etcd, eep::cluster::EtcdClient::Connect(o.coordinator));
  EEP_ASSIGN_OR_RETURN_CTX(*lease, eep::cluster::LeaseKeeper::Start(o.coordinator, o.lease_ttl_s, [] {
                             EEP_LOG_ERROR("serve: lost the etcd lease: another coordinator may take over");
                           }),
                           "--coordinator " + o.coordinator);
  const eep::ep::ClusterKeys keys{o.cluster};
  eep::ep::LeaderRecord me;
  me.id = fmt::format("{}@{}", getpid(), ep->control_host);
  if (!o.standby) {
    EEP_ASSIGN_OR_RETURN(auto active, (*etcd)->Get(keys.Leader()));
    if (active)
      return eep::Status::AlreadyExists(fmt::format(
          "cluster '{}' already has an active coordinator ({}); start this one with --standby to take over when it dies",
          o.cluster, active->value));
  }
  // While standing by, the HTTP port answers 503 with the active coordinator's address, so a
  // client that tries this one first learns where to go (and retries here after a take-over).
  std::unique_ptr<httplib::Server> standby_http;
  std::thread standby_thread;
  if (o.standby && o.server.port != 0) {
    standby_http = std::make_unique<httplib::Server>();
    // (As the server's, which binds this port once the standby's listener is gone.)
    eep::serve::UseServeSocketOptions(*standby_http);
    eep::cluster::EtcdClient* client = etcd->get();
    auto answer = [client, keys](const httplib::Request&, httplib::Response& res) {
      std::string leader;
      if (auto kv = client->Get(keys.Leader()); kv.ok() && *kv) {
        auto j = nlohmann::json::parse((*kv)->value, nullptr, false);
        if (j.is_object()) leader = j.value("http", std::string());
      }
      res.status = 503;
      res.set_content(nlohmann::json{{"error", {{"message", "standby coordinator: not serving until the active one fails"},
                                                {"type", "standby"}, {"leader", leader}}}}
                          .dump(),
                      "application/json");
    };
    standby_http->Get(".*", answer);
    standby_http->Post(".*", answer);
    if (!standby_http->bind_to_port(o.server.host, o.server.port))
      return eep::Status::IOError(fmt::format("--port {}: cannot listen on {}", o.server.port, o.server.host));
    standby_thread = std::thread([srv = standby_http.get()] { srv->listen_after_bind(); });
  }
  auto won = eep::ep::CampaignForLeader(**etcd, keys, (*lease)->id(), me, g_stopping);
  if (standby_http) {
    standby_http->stop();
    standby_thread.join();
  }
  if (!won.ok()) return won.status();
  EEP_LOG_INFO("serve: coordinator {} is the leader of cluster '{}'", me.id, o.cluster);
  // A recorded cluster with serving ranks is adopted (this coordinator replaces a dead one).
  EEP_ASSIGN_OR_RETURN(auto state, (*etcd)->Get(keys.State()));
  if (state) {
    auto j = nlohmann::json::parse(state->value, nullptr, false);
    ep->take_over = j.is_object() && !j.value("members", std::vector<int>{}).empty();
  }
  // Ranks run on the node agents: wait until they offer enough rank slots (a take-over uses
  // the ranks that run already).
  std::vector<eep::ep::NodeRecord> nodes;
  const double deadline = eep::NowSeconds() + static_cast<double>(o.wait_nodes_s);
  int64_t rev = 0;
  while (true) {
    EEP_ASSIGN_OR_RETURN(auto kvs, (*etcd)->GetPrefix(keys.Nodes(), &rev));
    nodes.clear();
    int capacity = 0;
    for (const auto& kv : kvs) {
      auto r = eep::ep::NodeRecord::FromJson(kv.value);
      if (!r.ok()) return r.status().WithContext(kv.key);
      capacity += r->capacity;
      nodes.push_back(std::move(*r));
    }
    if (capacity >= o.ep.ep || (ep->take_over && !nodes.empty())) break;
    if (g_stopping.load()) return eep::Status::Cancelled("stopped while waiting for nodes");
    if (eep::NowSeconds() > deadline)
      return eep::Status::Unavailable(fmt::format("--ep {}: the registered nodes offer {} rank slot(s) after {} s (start `eep node` on more hosts)",
                                                  o.ep.ep, capacity, o.wait_nodes_s));
    auto w = (*etcd)->WaitForChange(keys.Nodes(), rev, 500);
    if (!w.ok() && w.status().code() != eep::StatusCode::kTimeout) return w.status();
  }
  std::sort(nodes.begin(), nodes.end(), [](const auto& a, const auto& b) { return a.node_rank < b.node_rank || (a.node_rank == b.node_rank && a.name < b.name); });
  ep->backup_endpoints.clear();
  for (const auto& n : nodes) ep->nodes.push_back({n.name, n.endpoint, n.capacity});
  // The hosts' backup managers as they published themselves.
  EEP_ASSIGN_OR_RETURN(auto backups, (*etcd)->GetPrefix(keys.Backups()));
  for (const auto& kv : backups) {
    auto j = nlohmann::json::parse(kv.value, nullptr, false);
    if (!j.is_object() || !j.contains("endpoint")) return eep::Status::Corruption(kv.key + ": malformed backup record");
    ep->backup_endpoints.push_back(j["endpoint"].get<std::string>());
  }
  if (ep->communicator == "shm") {
    EEP_LOG_INFO("serve: ranks span hosts: data plane over ucx");
    ep->communicator = "ucx";
  }
  ep->coordinator_url = o.coordinator;
  ep->cluster = o.cluster;
  if (ep->take_over) EEP_LOG_INFO("serve: taking over the running ranks of cluster '{}'", o.cluster);
  eep::cluster::EtcdClient* client = etcd->get();
  const int64_t lease_id = (*lease)->id();
  ep->publish_endpoints = [client, keys, me, lease_id](const std::string& control, const std::string& heartbeat) {
    eep::ep::LeaderRecord rec = me;
    rec.control = control;
    rec.heartbeat = heartbeat;
    return client->Put(keys.Leader(), rec.ToJson().dump(), lease_id).status();
  };
  return eep::Status::Ok();
}

int RunServe(const ServeCliOptions& o) {
  if (o.ep.ep < 1)
    return eep::cli::Fail(eep::Status::InvalidArgument("--ep must be >= 1 for serve"));
  if (auto st = eep::serve::ValidateSchedulerOptions(o.server.scheduler); !st.ok())
    return eep::cli::Fail(st);
  // SIGINT/SIGTERM: a handler that writes to a pipe, read by one watcher thread. The signals are
  // blocked in this thread and so in every thread it creates (and in the rank processes, which
  // inherit the mask), so none of our syscalls is interrupted: a control-plane poll interrupted
  // mid-step would fail the engine. Threads that existed before (OpenBLAS's pool) and the
  // watcher take them. The ranks leave when the coordinator tells them to (or dies), so a Ctrl-C
  // reaching the whole process group shuts down gracefully instead of killing the ranks under
  // requests in flight.
  if (pipe2(g_signal_pipe, O_CLOEXEC) != 0)
    return eep::cli::Fail(eep::Status::IOError(std::string("pipe: ") + std::strerror(errno)));
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  // A taken port is found before the (possibly long) engine start, not after it.
  if (o.server.port != 0) {
    if (auto st = CheckPortFree(o.server.host, o.server.port); !st.ok()) return eep::cli::Fail(st);
  }
  // The node's DRAM backup of the expert weights: started here unless managers are given.
  // auto: CUDA when this host has a GPU (ranks on other hosts compute like this one).
  auto backend = eep::cuda::ResolveBackend(o.backend);
  if (!backend.ok()) return eep::cli::Fail(backend.status().WithContext("--backend"));
  eep::ep::EpOptions ep_options = eep::cli::EpOptionsFor(o.ep, *backend);
  std::unique_ptr<eep::backup::BackupSidecar> sidecar;
  std::unique_ptr<eep::cluster::LeaseKeeper> lease;
  std::unique_ptr<eep::cluster::EtcdClient> etcd;
  std::thread stop_watch;
  const bool backup = o.expert_backup == "on" || (o.expert_backup == "auto" && o.ep.ep > 1);
  if (!o.coordinator.empty()) {
    // A signal while standing by ends the wait (the watcher below starts only once serving).
    stop_watch = std::thread([stop_signals] {
      pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
      char sig = 0;
      while (!g_stopping.load()) {
        const ssize_t n = read(g_signal_pipe[0], &sig, 1);
        if (n < 0 && errno == EINTR) continue;
        g_stopping = true;
      }
    });
    auto st = SetUpCluster(o, &ep_options, &etcd, &lease);
    if (!st.ok()) {
      g_stopping = true;
      (void)!write(g_signal_pipe[1], "x", 1);
      stop_watch.join();
      return eep::cli::Fail(st);
    }
    // Hand the signal pipe to the serving watcher below.
    g_stopping = true;
    (void)!write(g_signal_pipe[1], "x", 1);
    stop_watch.join();
    g_stopping = false;
  } else if (backup && ep_options.backup_endpoints.empty()) {
    constexpr int64_t kBackupStartMs = 600000;  // loading every expert of a large checkpoint
    auto started = eep::backup::BackupSidecar::Start("/proc/self/exe", o.server.model_dir, 0, 1, o.backup_transport, {},
                                                     kBackupStartMs);
    if (!started.ok()) return eep::cli::Fail(started.status().WithContext("--expert-backup on"));
    sidecar = std::move(*started);
    ep_options.backup_endpoints = {sidecar->endpoint()};
    EEP_LOG_INFO("serve: DRAM expert backup manager (pid {}) at {}", sidecar->pid(), sidecar->endpoint());
  }
  auto engine = eep::ep::EpEngine::Start(o.server.model_dir, ep_options);
  if (!engine.ok()) return eep::cli::Fail(engine.status());
  auto started = eep::serve::Server::Start(o.server, eep::serve::WrapEpEngine(std::move(*engine)));
  if (!started.ok()) return eep::cli::Fail(started.status());
  std::shared_ptr<eep::serve::Server> server = std::move(*started);
  const std::string& host = server->host();
  const std::string url = host.find(':') != std::string::npos
                              ? fmt::format("http://[{}]:{}", host, server->port())
                              : fmt::format("http://{}:{}", host, server->port());
  // The one stdout line: scripts and tests read the address from it.
  if (etcd) {
    // Clients and operators find the active coordinator's HTTP address in the leader record.
    eep::ep::ClusterKeys keys{o.cluster};
    auto cur = etcd->Get(keys.Leader());
    if (cur.ok() && *cur) {
      auto j = nlohmann::json::parse((*cur)->value, nullptr, false);
      if (j.is_object()) {
        j["http"] = url;
        (void)etcd->Put(keys.Leader(), j.dump(), lease->id());
      }
    }
  }
  fmt::print("listening {}\n", url);
  std::fflush(stdout);
  EEP_LOG_INFO("serve: listening on {}", url);
  // The first signal drains in-flight requests, a second one cancels them. The thread keeps
  // its reference to the server and is left blocked in read at exit.
  std::thread([server, stop_signals] {
    pthread_sigmask(SIG_UNBLOCK, &stop_signals, nullptr);
    int count = 0;
    char sig = 0;
    while (true) {
      const ssize_t n = read(g_signal_pipe[0], &sig, 1);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;
      EEP_LOG_INFO("serve: {} received; {}", sig == SIGINT ? "SIGINT" : "SIGTERM",
                   count == 0 ? "finishing requests in flight" : "cancelling requests in flight");
      server->RequestStop(count++ > 0);
    }
  }).detach();
  eep::Status st = server->Wait();
  if (!st.ok()) return eep::cli::Fail(st.WithContext("engine"));
  return 0;
}

EEP_REGISTER_COMMAND(
    serve, "serve", "OpenAI-compatible HTTP server with continuous batching",
    [](CLI::App* app) -> std::function<int()> {
      auto o = std::make_shared<ServeCliOptions>();
      o->ep.ep = 1;  // the server always runs through the EP engine
      auto& s = o->server;
      app->add_option("--model", s.model_dir, "checkpoint directory")->required();
      app->add_option("--host", s.host, "address to bind (default 127.0.0.1)");
      app->add_option("--port", s.port, "port (0 = any free port)")->check(CLI::Range(0, 65535));
      app->add_option("--max-num-seqs", s.scheduler.max_num_seqs,
                      "most sequences in the running batch (default 64)")
          ->check(CLI::PositiveNumber);
      app->add_option("--max-num-batched-tokens", s.scheduler.max_num_batched_tokens,
                      "token budget of one step, prefill and decode (default 2048)")
          ->check(CLI::PositiveNumber);
      app->add_option("--served-model-name", s.served_model_name,
                      "model name in the API (default: the model directory's name)");
      app->add_option("--shutdown-timeout", s.shutdown_timeout_s,
                      "seconds in-flight requests may take to finish on SIGTERM (default 30)")
          ->check(CLI::NonNegativeNumber);
      app->add_option("--http-threads", s.http_threads,
                      "HTTP handler threads (default 2 * max-num-seqs + 16)")
          ->check(CLI::NonNegativeNumber);
      eep::cli::AddEpFlags(app, &o->ep);
      app->add_option("--expert-backup", o->expert_backup,
                      "keep a DRAM backup of the expert weights in a backup manager started here: on | off | auto "
                      "(on when --ep > 1; ignored when --expert-backup-endpoints is given)")
          ->check(CLI::IsMember({"on", "off", "auto"}));
      app->add_option("--backend", o->backend, "where every rank computes: auto (default: cuda when a GPU is present) | cpu | cuda")
          ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
      app->add_option("--backup-transport", o->backup_transport, "transfer backend of that backup manager (shm | ucx)");
      app->add_option("--coordinator", o->coordinator,
                      "etcd://HOST:PORT[,...]: many hosts; ranks run on `eep node` hosts, membership lives in etcd");
      app->add_option("--cluster", o->cluster, "cluster name in etcd (keys under /eep/NAME/)");
      app->add_flag("--standby", o->standby,
                    "expect another coordinator to be active: wait, and take over its ranks when it dies");
      app->add_option("--lease-ttl", o->lease_ttl_s, "seconds of the coordinator's etcd lease (failover delay)")
          ->check(CLI::PositiveNumber);
      app->add_option("--wait-nodes", o->wait_nodes_s, "seconds to wait for enough `eep node` rank slots")
          ->check(CLI::NonNegativeNumber);
      app->add_option("--control-host", o->ep.options.control_host,
                      "address the ranks reach this coordinator at (default 127.0.0.1; another host's ranks need a routable one)");
      return [o] { return RunServe(*o); };
    });

}  // namespace
