// Hugging Face `tokenizer.json` byte-level BPE tokenizer (the GPT-2 / Qwen family), see
// MODELS.md §6. Encoding runs: added tokens (leftmost, longest) -> NFC -> regex Split ->
// ByteLevel byte->char map -> BPE merges by rank -> vocab ids. Decoding maps token chars back
// to bytes and decodes UTF-8 lossily (invalid bytes -> U+FFFD); added tokens decode to their text.
//
// Supported layouts (anything else is rejected at load with an error naming file and field):
//   model        BPE (merges as ["a","b"] pairs or "a b" strings; unk_token, byte_fallback,
//                ignore_merges honoured; dropout, continuing_subword_prefix and
//                end_of_word_suffix must be unset)
//   normalizer   null, NFC, or a Sequence of those
//   pre_tokenizer Split (Regex or String pattern, behavior Isolated, invert false) and/or
//                ByteLevel (use_regex true -> the GPT-2 regex; add_prefix_space), alone or in a
//                Sequence
//   decoder      ByteLevel (or a Sequence containing only ByteLevel)
//   post_processor is not applied: Encode() is `add_special_tokens=False`.
//
// Threading: a loaded Tokenizer is immutable except for an internal, mutex-sharded BPE word
// cache, so all const methods may be called concurrently from any number of threads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"

namespace eep {

class Tokenizer {
 public:
  // Reads and validates `path`; errors name the file and the offending field.
  static Result<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  // Parses `json_text`; `source` names it in error messages (a path or "<embedded>").
  static Result<std::unique_ptr<Tokenizer>> FromJson(const std::string& json_text,
                                                     const std::string& source);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Text (UTF-8) -> ids. Added/special tokens written in the text become their ids. Invalid
  // UTF-8 input is an InvalidArgument naming the byte offset.
  Result<std::vector<int64_t>> Encode(const std::string& text) const;

  // Ids -> text. An id that names no token is an InvalidArgument naming the id.
  Result<std::string> Decode(const std::vector<int64_t>& ids) const;

  // Max id + 1 over the model vocab and the added tokens (the model's embedding may be larger).
  int64_t vocab_size() const;

  // Token string (byte-level form, e.g. "Ġthe", or an added token's content) <-> id.
  std::optional<int64_t> TokenToId(const std::string& token) const;
  std::optional<std::string> IdToToken(int64_t id) const;

  // Where it was loaded from (for messages).
  const std::string& source() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Unicode NFC of valid UTF-8 `text` (the tokenizer's normalizer, exposed for tests). ASCII and
// text that passes the NFC quick check are returned unchanged without decomposing.
std::string NfcNormalize(const std::string& text);

}  // namespace eep
