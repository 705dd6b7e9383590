// The chunk table of the multi-tensor kernels (apex multi_tensor_apply style):
// every tensor is cut into chunks of at most `chunk_size` elements, and one chunk is
// one unit of work (a CPU range item, a CUDA block, a Triton program). The table is
// fixed by the tensor sizes alone, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace fastmerge {

struct Chunk {
  int32_t tensor;  // index into the tensor list
  int64_t begin;   // first element of the chunk
  int64_t length;  // number of elements (> 0)
};

inline std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels, int64_t chunk_size) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += chunk_size) {
      const int64_t length = numels[t] - begin < chunk_size ? numels[t] - begin : chunk_size;
      chunks.push_back(Chunk{static_cast<int32_t>(t), begin, length});
    }
  }
  return chunks;
}

// Exclusive prefix sum of the chunk lengths (chunks.size() + 1 entries).
inline std::vector<int64_t> chunk_offsets(const std::vector<Chunk>& chunks) {
  std::vector<int64_t> prefix(chunks.size() + 1, 0);
  for (size_t i = 0; i < chunks.size(); ++i) prefix[i + 1] = prefix[i] + chunks[i].length;
  return prefix;
}

}  // namespace fastmerge
