#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <filesystem>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/util.h"

namespace eep {

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_bytes_);
}

namespace {

// Bounds a header so a corrupt length cannot make us parse gigabytes of JSON.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::NotFound(fmt::format("{}: cannot open ({})", path, std::strerror(errno)));
  FdCloser closer{fd};
  struct stat st {};
  if (fstat(fd, &st) != 0) return Status::IOError(path + ": fstat failed");
  uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < 8)
    return Status::Corruption(fmt::format("{}: truncated: {} bytes, shorter than the 8-byte header length", path, file_bytes));

  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_bytes_ = file_bytes;
  f->map_ = mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    return Status::IOError(fmt::format("{}: mmap failed ({})", path, std::strerror(errno)));
  }
  const auto* base = static_cast<const uint8_t*>(f->map_);
  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, base, 8);  // little-endian on every host we support
  if (header_bytes > kMaxHeaderBytes || 8 + header_bytes > file_bytes)
    return Status::Corruption(fmt::format(
        "{}: truncated or corrupt: header length {} exceeds file size {}", path, header_bytes, file_bytes));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(base + 8, base + 8 + header_bytes);
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption(fmt::format("{}: header is not valid JSON: {}", path, e.what()));
  }
  if (!header.is_object()) return Status::Corruption(path + ": header is not a JSON object");
  const uint64_t data_start = 8 + header_bytes;
  const uint64_t data_bytes = file_bytes - data_start;

  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [begin, end) within the data section
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (it->is_object())
        for (auto m = it->begin(); m != it->end(); ++m)
          if (m->is_string()) f->metadata_[m.key()] = m->get<std::string>();
      continue;
    }
    const auto& t = *it;
    auto bad = [&](const std::string& what) {
      return Status::Corruption(fmt::format("{}: tensor '{}': {}", path, name, what));
    };
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets"))
      return bad("entry needs dtype, shape and data_offsets");
    if (!t["dtype"].is_string()) return bad("dtype is not a string");
    TensorInfo info;
    info.name = name;
    info.file = path;
    auto dtype = ParseDType(t["dtype"].get<std::string>());
    if (!dtype.ok()) return bad(dtype.status().message());
    info.dtype = *dtype;
    if (!t["shape"].is_array()) return bad("shape is not a list");
    uint64_t numel = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) return bad("shape has a non-integer or negative dim");
      info.shape.push_back(d.get<int64_t>());
      numel *= static_cast<uint64_t>(d.get<int64_t>());
    }
    const auto& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return bad("data_offsets must be two non-negative integers");
    uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end) return bad(fmt::format("data_offsets [{}, {}] are reversed", begin, end));
    if (end > data_bytes)
      return bad(fmt::format("data_offsets [{}, {}] run past the end of the data ({} bytes): file truncated?",
                             begin, end, data_bytes));
    uint64_t expected = numel * DTypeSize(info.dtype);
    if (end - begin != expected)
      return bad(fmt::format("{} bytes for shape {} of {} needs {}", end - begin, ShapeToString(info.shape),
                             DTypeName(info.dtype), expected));
    info.file_offset = data_start + begin;
    info.nbytes = expected;
    info.data = base + info.file_offset;
    if (expected > 0) ranges.emplace_back(begin, end);
    f->tensors_.emplace(name, std::move(info));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      std::string a, b;
      for (const auto& [n, ti] : f->tensors_) {
        if (ti.file_offset - data_start == ranges[i - 1].first) a = n;
        if (ti.file_offset - data_start == ranges[i].first) b = n;
      }
      return Status::Corruption(fmt::format("{}: tensors '{}' and '{}' overlap", path, a, b));
    }
  }
  // Weights are read once per tensor, mostly sequentially.
  madvise(f->map_, f->map_bytes_, MADV_WILLNEED);
  return f;
}

Result<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto ckpt = std::unique_ptr<Checkpoint>(new Checkpoint());
  ckpt->dir_ = dir;
  std::vector<std::string> files;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return Status::NotFound(dir + ": not a directory");
  std::string index_path = dir + "/model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  if (fs::exists(index_path, ec)) {
    EEP_ASSIGN_OR_RETURN(nlohmann::json idx, ReadJsonFile(index_path));
    if (!idx.contains("weight_map") || !idx["weight_map"].is_object())
      return Status::Corruption(index_path + ": missing object 'weight_map'");
    for (auto it = idx["weight_map"].begin(); it != idx["weight_map"].end(); ++it) {
      if (!it->is_string()) return Status::Corruption(index_path + ": weight_map['" + it.key() + "'] is not a string");
      weight_map[it.key()] = it->get<std::string>();
      files.push_back(it->get<std::string>());
    }
    std::sort(files.begin(), files.end());
    files.erase(std::unique(files.begin(), files.end()), files.end());
  } else if (fs::exists(dir + "/model.safetensors", ec)) {
    files.push_back("model.safetensors");
  } else {
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".safetensors") files.push_back(e.path().filename().string());
    std::sort(files.begin(), files.end());
    if (files.empty()) return Status::NotFound(dir + ": no model.safetensors, index or *.safetensors file");
  }
  for (const auto& name : files) {
    EEP_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(dir + "/" + name));
    for (const auto& [tname, info] : file->tensors()) {
      if (!weight_map.empty()) {
        auto it = weight_map.find(tname);
        if (it == weight_map.end() || it->second != name) continue;  // index is the authority
      }
      if (ckpt->index_.count(tname))
        return Status::Corruption(fmt::format("{}: tensor '{}' appears in two files", dir, tname));
      ckpt->index_[tname] = &info;
    }
    ckpt->files_.push_back(std::move(file));
  }
  for (const auto& [tname, file] : weight_map)
    if (!ckpt->index_.count(tname))
      return Status::Corruption(fmt::format("{}: index lists tensor '{}' in {}, but that file lacks it",
                                            index_path, tname, file));
  return ckpt;
}

const TensorInfo* Checkpoint::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

Result<const TensorInfo*> Checkpoint::Get(const std::string& name) const {
  const TensorInfo* t = Find(name);
  if (!t) return Status::NotFound(fmt::format("{}: missing tensor '{}'", dir_, name));
  return t;
}

Result<const TensorInfo*> Checkpoint::GetChecked(const std::string& name,
                                                 const std::vector<int64_t>& expected_shape) const {
  EEP_ASSIGN_OR_RETURN(const TensorInfo* t, Get(name));
  if (t->dtype != DType::kBF16 && t->dtype != DType::kF16 && t->dtype != DType::kF32) {
    std::string hint = t->dtype == DType::kF8E4M3 ? " (FP8 checkpoints are not supported yet)" : "";
    return Status::InvalidArgument(fmt::format("{}: tensor '{}' has dtype {}, expected BF16, F16 or F32{}",
                                               t->file, name, DTypeName(t->dtype), hint));
  }
  if (t->shape != expected_shape)
    return Status::InvalidArgument(fmt::format("{}: tensor '{}' has shape {}, expected {}", t->file, name,
                                               ShapeToString(t->shape), ShapeToString(expected_shape)));
  return t;
}

Result<std::vector<float>> Checkpoint::ReadF32(const std::string& name,
                                               const std::vector<int64_t>& expected_shape) const {
  EEP_ASSIGN_OR_RETURN(const TensorInfo* t, GetChecked(name, expected_shape));
  std::vector<float> out(static_cast<size_t>(t->numel()));
  EEP_RETURN_IF_ERROR(ConvertToF32(t->dtype, t->data, out.size(), out.data()));
  return out;
}

std::string Checkpoint::Fingerprint() const {
  // FNV-1a over names, dtypes, shapes and up to 64 bytes from each tensor's start and end.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  for (const auto& [name, t] : index_) {
    mix(name.data(), name.size());
    int dt = static_cast<int>(t->dtype);
    mix(&dt, sizeof dt);
    for (int64_t d : t->shape) mix(&d, sizeof d);
    size_t n = std::min<uint64_t>(64, t->nbytes);
    mix(t->data, n);
    mix(t->data + t->nbytes - n, n);
  }
  return fmt::format("{:016x}", h);
}

Status WriteSafetensorsWith(const std::string& path, const std::vector<TensorToWrite>& specs,
                            const std::function<Status(size_t, uint8_t*)>& fill,
                            const std::map<std::string, std::string>& metadata, int fill_threads) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::vector<uint64_t> sizes;
  for (const auto& t : specs) {
    uint64_t n = DTypeSize(t.dtype);
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    header[t.name] = {{"dtype", DTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + n}}};
    sizes.push_back(n);
    offset += n;
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');  // data section 8-byte aligned
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "wb"), &std::fclose);
  if (!f) return Status::IOError(fmt::format("{}: cannot open for writing ({})", path, std::strerror(errno)));
  uint64_t hlen = h.size();
  bool ok = std::fwrite(&hlen, 8, 1, f.get()) == 1 && std::fwrite(h.data(), 1, h.size(), f.get()) == h.size();
  // Tensors are filled a group at a time (up to kGroupBytes, at least one tensor), on
  // fill_threads threads, then written in order.
  constexpr uint64_t kGroupBytes = 1ull << 30;
  const size_t threads = static_cast<size_t>(std::max(1, fill_threads));
  std::vector<std::vector<uint8_t>> bufs;
  for (size_t begin = 0; ok && begin < specs.size();) {
    size_t end = begin;
    uint64_t group = 0;
    while (end < specs.size() && (end == begin || group + sizes[end] <= kGroupBytes)) group += sizes[end++];
    bufs.resize(end - begin);
    for (size_t i = begin; i < end; ++i) bufs[i - begin].resize(sizes[i]);
    std::vector<Status> st(end - begin, Status::Ok());
    std::atomic<size_t> next{begin};
    auto work = [&] {
      for (size_t i; (i = next.fetch_add(1)) < end;)
        if (sizes[i] > 0) st[i - begin] = fill(i, bufs[i - begin].data());
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < std::min(threads, end - begin); ++t) pool.emplace_back(work);
    work();
    for (auto& t : pool) t.join();
    for (size_t i = begin; ok && i < end; ++i) {
      EEP_RETURN_IF_ERROR_CTX(st[i - begin], path + ": tensor '" + specs[i].name + "'");
      ok = std::fwrite(bufs[i - begin].data(), 1, sizes[i], f.get()) == sizes[i];
    }
    begin = end;
  }
  ok = (std::fclose(f.release()) == 0) && ok;
  if (!ok) return Status::IOError(path + ": write failed (disk full?)");
  return Status::Ok();
}

Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                        const std::map<std::string, std::string>& metadata) {
  return WriteSafetensorsWith(
      path, tensors,
      [&tensors](size_t i, uint8_t* buf) {
        const auto& t = tensors[i];
        uint64_t n = DTypeSize(t.dtype);
        for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
        std::memcpy(buf, t.data, n);
        return Status::Ok();
      },
      metadata);
}

}  // namespace eep
