// safetensors checkpoints: mmap'd, single file or sharded (model.safetensors.index.json).
// Headers are validated fully at open time (offsets inside the data section, sizes equal to
// shape x dtype, no overlaps), so later accesses cannot run off the mapping.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/status.h"

namespace eep {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::string file;         // absolute or as-given path of the file holding it
  uint64_t file_offset = 0; // byte offset of the data from the start of the file
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;  // inside the mapping; valid while the owner lives

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// One mmap'd .safetensors file. Thread-safe for reads once opened.
class SafetensorsFile {
 public:
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // Opens and validates `path`. Errors name the file and, where one is at fault, the tensor.
  static Result<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards listed in
// model.safetensors.index.json, or (fallback) every *.safetensors file in the directory.
class Checkpoint {
 public:
  static Result<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // nullptr when absent.
  const TensorInfo* Find(const std::string& name) const;
  // NotFound naming the tensor and the directory when absent.
  Result<const TensorInfo*> Get(const std::string& name) const;
  // Get + check dtype is a float type and shape equals `expected_shape`; errors name the tensor.
  Result<const TensorInfo*> GetChecked(const std::string& name,
                                       const std::vector<int64_t>& expected_shape) const;
  // Reads a float tensor into f32 (converting BF16/F16), checking its shape.
  Result<std::vector<float>> ReadF32(const std::string& name,
                                     const std::vector<int64_t>& expected_shape) const;
  const std::map<std::string, const TensorInfo*>& tensors() const { return index_; }
  // Stable fingerprint of the checkpoint: hash over tensor names, dtypes, shapes and sizes,
  // plus a sample of bytes of each tensor. Cheap (does not read whole tensors).
  std::string Fingerprint() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

// Writes tensors into one .safetensors file. `data` holds raw bytes in the tensor's dtype.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
};
Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata = {});

// Streaming form for files larger than memory: the header is written from `specs` (data
// pointers ignored), then fill(i, buffer) produces tensor i's bytes into a buffer of its size.
// With fill_threads > 1, fill runs on that many threads at once (on up to ~1 GiB of tensors
// ahead of the writer), so it must be thread-safe; the file's bytes do not depend on it.
Status WriteSafetensorsWith(const std::string& path, const std::vector<TensorToWrite>& specs,
                            const std::function<Status(size_t, uint8_t*)>& fill,
                            const std::map<std::string, std::string>& metadata = {}, int fill_threads = 1);

std::string ShapeToString(const std::vector<int64_t>& shape);

}  // namespace eep
