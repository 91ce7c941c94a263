// CRC-32C (Castagnoli), the checksum the merge records per output shard and `verify` checks.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mergealign {

// CRC-32C of `length` bytes following data whose CRC-32C is `crc` (0 for none): chaining calls
// over consecutive pieces gives the CRC of their concatenation.  SSE4.2 when the CPU has it.
uint32_t crc32c_update(uint32_t crc, const unsigned char* data, size_t length);

// CRC-32C of A followed by B, from crc(A), crc(B) and B's length, without reading either: lets
// threads checksum their own pieces and the results be joined in file order.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b);

}  // namespace mergealign
