// eep rank-worker: internal; the coordinator starts one per rank (see src/ep/ep.h).
#include "command.h"
#include "ep/ep.h"

namespace {

struct RankWorkerCli {
  std::string control, heartbeat, session, coordinator, cluster = "default";
  int rank = 0;
};

EEP_REGISTER_COMMAND(rank_worker, "rank-worker", "internal: one expert-parallel rank (started by the coordinator)",
                     [](CLI::App* app) -> std::function<int()> {
                       auto o = std::make_shared<RankWorkerCli>();
                       app->group("");  // hidden from --help
                       app->add_option("--control", o->control, "coordinator control endpoint")->required();
                       app->add_option("--heartbeat", o->heartbeat, "coordinator heartbeat endpoint")->required();
                       app->add_option("--rank", o->rank, "rank id")->required();
                       app->add_option("--session", o->session, "engine session name")->required();
                       app->add_option("--coordinator", o->coordinator, "etcd://...: follow the leader record (ranks of eep node)");
                       app->add_option("--cluster", o->cluster, "cluster name under /eep/ in etcd");
                       return [o] {
                         return eep::ep::RunRankWorker(o->control, o->heartbeat, o->rank, o->session, o->coordinator, o->cluster);
                       };
                     });

}  // namespace
