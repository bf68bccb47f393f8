// The tokenizer that `eep make-model` writes next to random checkpoints: the 503-token
// byte-level BPE of the golden test data (MODELS.md §6), embedded so no file is needed.
#pragma once

#include <string>

namespace eep {

// The exact bytes of tests/data/tokenizer/tokenizer.json (a test checks they stay equal).
// A static string; safe to call from any thread.
const std::string& DefaultTokenizerJson();

}  // namespace eep
