/* SHA-256 over many small messages in one call: the ledger's row hashes and the
 * RFC 6962 interior nodes of its Merkle tree. Loaded by accounting/hashing.py with
 * ctypes; OpenSSL's low-level SHA-256 (SHA-NI where the CPU has it) does the hashing,
 * this file only removes the per-message Python call. */
#include <stdint.h>
#include <string.h>
#include <openssl/sha.h>

/* out[32*i..] = SHA-256(data[offsets[i] .. offsets[i+1]]) for i < n: the values of an
 * Arrow binary array (int32 offsets). */
void sandfleet_sha256_each(const uint8_t *data, const int32_t *offsets, int64_t n,
                           uint8_t *out) {
    SHA256_CTX ctx;
    for (int64_t i = 0; i < n; i++) {
        SHA256_Init(&ctx);
        SHA256_Update(&ctx, data + offsets[i], (size_t)(offsets[i + 1] - offsets[i]));
        SHA256_Final(out + 32 * i, &ctx);
    }
}

/* out[32*i..] = SHA-256(0x01 || in[64*i .. 64*i+64]) for i < pairs: one level of
 * RFC 6962 node hashes over consecutive pairs of 32-byte hashes. */
void sandfleet_sha256_pairs(const uint8_t *in, int64_t pairs, uint8_t *out) {
    static const uint8_t node = 0x01;
    SHA256_CTX ctx;
    for (int64_t i = 0; i < pairs; i++) {
        SHA256_Init(&ctx);
        SHA256_Update(&ctx, &node, 1);
        SHA256_Update(&ctx, in + 64 * i, 64);
        SHA256_Final(out + 32 * i, &ctx);
    }
}
