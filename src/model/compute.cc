#include "model/compute.h"

#include <fmt/format.h>

#include "model/generate.h"

namespace eep {

Status ComputeModel::Forward(std::span<ComputeStep> batch) {
  for (size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].cache == nullptr)
      return Status::InvalidArgument(fmt::format("forward: sequence {} of the batch has no KV cache", i));
    if (batch[i].cache->owner() != this)
      return Status::InvalidArgument(
          fmt::format("forward: sequence {} of the batch has a KV cache made by another model", i));
  }
  return ForwardChecked(batch);
}

Result<std::vector<int64_t>> Generate(ComputeModel& model, const std::vector<int64_t>& prompt_ids,
                                      const GenerateOptions& options) {
  return GenerateOneSequence<ComputeStep>(model, prompt_ids, options);
}

}  // namespace eep
