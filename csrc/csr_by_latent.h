// Groups the B*k (row, slot) entries of a TopK encode by latent: a stable counting sort
// into CSR form. Every backward op that sums over "the entries that hit latent j" walks one
// segment per latent, so one worker owns each output row and no float atomics are needed:
// the sums are taken in a fixed order and two runs give bit-identical gradients.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace fastsae {

struct LatentCSR {
  at::Tensor latents;  // [u] int64: the touched latent ids, ascending
  at::Tensor offsets;  // [u+1] int64: segment g is order[offsets[g] : offsets[g+1]]
  at::Tensor order;    // [E] int64: flat entry ids b*k+s, ascending within a segment
  at::Tensor slot;     // [E] int64: the segment of each flat entry (inverse of order)
  at::Tensor row;      // [E] int64: row[p] = order[p] / k, the entry's row (no division in the walks)
};

// indices: contiguous int64 [B, k], every entry already checked to lie in [0, n).
inline LatentCSR csr_by_latent(const at::Tensor& indices, int64_t n) {
  const int64_t E = indices.numel();
  const int64_t* idx = indices.data_ptr<int64_t>();
  auto opts = indices.options().dtype(at::kLong);
  // counts, then reused as each latent's write cursor: O(n) memory, O(E + n) time.
  std::vector<int64_t> cursor(static_cast<size_t>(n), 0);
  for (int64_t e = 0; e < E; ++e) ++cursor[idx[e]];
  int64_t u = 0;
  for (int64_t j = 0; j < n; ++j) u += cursor[j] != 0;

  LatentCSR csr;
  csr.latents = at::empty({u}, opts);
  csr.offsets = at::empty({u + 1}, opts);
  csr.order = at::empty({E}, opts);
  csr.slot = at::empty({E}, opts);
  csr.row = at::empty({E}, opts);
  int64_t* lat = csr.latents.data_ptr<int64_t>();
  int64_t* off = csr.offsets.data_ptr<int64_t>();
  int64_t* ord = csr.order.data_ptr<int64_t>();
  int64_t* slot = csr.slot.data_ptr<int64_t>();
  int64_t* row = csr.row.data_ptr<int64_t>();

  int64_t g = 0, pos = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = cursor[j];
    if (c == 0) continue;
    lat[g] = j;
    off[g] = pos;
    cursor[j] = pos;
    pos += c;
    ++g;
  }
  off[u] = E;
  const int64_t k = indices.dim() == 2 ? indices.size(1) : 1;
  for (int64_t e = 0, b = 0, s = 0; e < E; ++e) {  // stable: entries keep row order
    const int64_t p = cursor[idx[e]]++;
    ord[p] = e;
    row[p] = b;
    if (++s == k) s = 0, ++b;
  }
  for (int64_t s = 0; s < u; ++s)
    for (int64_t p = off[s]; p < off[s + 1]; ++p) slot[ord[p]] = s;
  return csr;
}

}  // namespace fastsae
