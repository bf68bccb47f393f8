// The backups' anti-affinity rule against eep's real rank placement: the node serving an expert
// (InitialPlacement, ranks filled into nodes in order, as the coordinator does) never holds that
// expert's only DRAM copy, over many model and cluster shapes.
#include <gtest/gtest.h>

#include <set>

#include "backup/backup.h"
#include "ep/ep.h"

namespace eep {
namespace {

TEST(BackupPlacement, AntiAffinityKeepsCopiesOffTheServingNode) {
  int checked = 0;
  for (int64_t experts : {8, 16, 60, 64, 128, 256})
    for (int nodes : {2, 3, 4, 8})
      for (int ranks_per_node : {1, 2, 4})
        for (int64_t redundant : {0, 4})
          for (int replicas = 1; replicas <= nodes - 1; ++replicas) {
            const int ep_size = nodes * ranks_per_node;
            if (experts < ep_size) continue;
            auto layout = ep::MakeSlotLayout(experts, redundant, ep_size);
            ASSERT_TRUE(layout.ok());
            const ExpertMap map = ep::InitialPlacement(*layout, 1);
            // Nodes serving each expert (any replica).
            std::vector<std::set<int>> serving(static_cast<size_t>(experts));
            for (int64_t s = 0; s < layout->num_physical; ++s)
              serving[static_cast<size_t>(map.LogicalAt(0, s))].insert(layout->RankOfSlot(s) / ranks_per_node);
            for (int64_t e = 0; e < experts; ++e) {
              const auto holders =
                  backup::BackupNodesOf(backup::BackupPlacement::kAntiAffinity, e, experts, nodes, replicas,
                                        layout->slots_per_rank * ranks_per_node);
              ASSERT_EQ(holders.size(), static_cast<size_t>(replicas));
              ASSERT_EQ(std::set<int>(holders.begin(), holders.end()).size(), holders.size()) << "distinct nodes";
              // The home node (the one holding the primary replica, slot e) never backs it up; so
              // losing any one node leaves either a GPU copy or a DRAM copy of every expert.
              const int home = layout->RankOfSlot(e) / ranks_per_node;
              for (int n : holders) EXPECT_NE(n, home) << "expert " << e << " of " << experts << ", " << nodes << " nodes";
              for (int dead = 0; dead < nodes; ++dead) {
                bool survives = false;
                for (int n : serving[static_cast<size_t>(e)]) survives |= n != dead;
                for (int n : holders) survives |= n != dead;
                EXPECT_TRUE(survives) << "expert " << e << " lost with node " << dead;
              }
              ++checked;
            }
          }
  EXPECT_GT(checked, 10000);
}

TEST(BackupPlacement, StripeCanLoseAnExpertWithItsNode) {
  // What anti-affinity fixes: under the stripe rule (e mod N) expert 0 is served and backed up
  // by node 0 in a 2-node, 8-expert cluster.
  auto layout = ep::MakeSlotLayout(8, 0, 2);
  ASSERT_TRUE(layout.ok());
  EXPECT_EQ(layout->RankOfSlot(0), 0);
  EXPECT_EQ(backup::BackupNodesOf(backup::BackupPlacement::kStripe, 0, 8, 2, 1), std::vector<int>{0});
  EXPECT_EQ(backup::BackupNodesOf(backup::BackupPlacement::kAntiAffinity, 0, 8, 2, 1), std::vector<int>{1});
}

TEST(BackupPlacement, ValidationNamesTheFlags) {
  auto bad = backup::ParseBackupPlacement("spread");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--backup-placement"), std::string::npos);
  Status too_many = backup::ValidatePlacement(backup::BackupPlacement::kAntiAffinity, 3, 3);
  EXPECT_FALSE(too_many.ok());
  EXPECT_NE(too_many.message().find("--replicas"), std::string::npos);
  EXPECT_TRUE(backup::ValidatePlacement(backup::BackupPlacement::kAntiAffinity, 3, 2).ok());
  EXPECT_TRUE(backup::ValidatePlacement(backup::BackupPlacement::kAntiAffinity, 1, 1).ok());  // one node: itself
  EXPECT_EQ(backup::BackupNodesOf(backup::BackupPlacement::kAntiAffinity, 5, 8, 1, 1), std::vector<int>{0});
}

}  // namespace
}  // namespace eep
