//! The keys of one seed: derived from the cluster key (or a separate seed key) and the seed
//! id, one for the AEAD, one for the keyed digests, one for the volume headers' MAC, one for
//! the manifests' outer MAC, and a check value that tells a wrong key from a damaged medium.
//!
//! Invariants: each key has its own BLAKE3 `derive_key` context, so no key is ever used for
//! two purposes; key material never appears in `Debug` output.

use std::fmt;

use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};

use crate::transfer::ClusterKey;

const AEAD_CONTEXT: &str = "ferry seed v1 2026-12 aead key";
const DIGEST_CONTEXT: &str = "ferry seed v1 2026-12 digest key";
const CHECK_CONTEXT: &str = "ferry seed v1 2026-12 key check";
const HEADER_MAC_CONTEXT: &str = "ferry seed v1 2026-12 header mac key";
const MANIFEST_MAC_CONTEXT: &str = "ferry seed v1 2026-12 manifest mac key";

/// The keys of one seed.
pub struct SeedKeys {
    pub(super) aead: LessSafeKey,
    digest_key: [u8; 32],
    header_mac_key: [u8; 32],
    manifest_mac_key: [u8; 32],
    check: [u8; 32],
    seed_id: [u8; 16],
}

impl fmt::Debug for SeedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeedKeys")
            .field("seed_id", &self.seed_id)
            .finish_non_exhaustive()
    }
}

impl SeedKeys {
    /// The keys of seed `seed_id` under the cluster key.
    pub fn from_cluster(cluster: &ClusterKey, seed_id: [u8; 16]) -> SeedKeys {
        Self::from_seed_key(cluster.seed_key(&seed_id), seed_id)
    }

    /// The keys of seed `seed_id` under a seed key (`--seed-key`, or the cluster's).
    pub fn from_seed_key(seed_key: [u8; 32], seed_id: [u8; 16]) -> SeedKeys {
        let aead_bytes = blake3::derive_key(AEAD_CONTEXT, &seed_key);
        let aead = UnboundKey::new(&AES_256_GCM, &aead_bytes).expect("32 bytes is an AES-256 key");
        SeedKeys {
            aead: LessSafeKey::new(aead),
            digest_key: blake3::derive_key(DIGEST_CONTEXT, &seed_key),
            header_mac_key: blake3::derive_key(HEADER_MAC_CONTEXT, &seed_key),
            manifest_mac_key: blake3::derive_key(MANIFEST_MAC_CONTEXT, &seed_key),
            check: blake3::derive_key(CHECK_CONTEXT, &seed_key),
            seed_id,
        }
    }

    /// The seed these keys belong to.
    pub fn seed_id(&self) -> &[u8; 16] {
        &self.seed_id
    }

    /// The value a medium's header stores so that import can say "wrong key" rather than
    /// "corrupt" (it reveals nothing of the keys: a keyed hash of a constant).
    pub fn check_value(&self) -> [u8; 32] {
        self.check
    }

    /// Whether `stored` is this key's check value; constant time.
    pub fn matches(&self, stored: &[u8; 32]) -> bool {
        blake3::Hash::from(self.check) == blake3::Hash::from(*stored)
    }

    /// The keyed digest of an extent's plaintext, as the manifest lists it.
    pub fn digest(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.digest_key, data).as_bytes()
    }

    /// The MAC of a volume header's fields (keyed BLAKE3: the header is rewritten in place,
    /// so it gets no nonce-based tag; see `header.rs`).
    pub fn header_mac(&self, fields: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.header_mac_key, fields).as_bytes()
    }

    /// The MAC of a sealed manifest's ciphertext, checked before decryption is attempted.
    pub fn manifest_mac(&self, ciphertext: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.manifest_mac_key, ciphertext).as_bytes()
    }
}

/// Whether two MACs are equal, in constant time.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_seed_and_per_cluster_and_check_tells_them_apart() {
        // Goal: another seed id or another cluster key gives other keys, and the check value
        // says which key is right. Method: derive for two ids and two clusters, compare.
        let cluster = ClusterKey::from_bytes([7; 32]);
        let other_cluster = ClusterKey::from_bytes([8; 32]);
        let a = SeedKeys::from_cluster(&cluster, [1; 16]);
        let b = SeedKeys::from_cluster(&cluster, [2; 16]);
        let c = SeedKeys::from_cluster(&other_cluster, [1; 16]);
        assert!(a.matches(&a.check_value()));
        assert!(!a.matches(&b.check_value()));
        assert!(!a.matches(&c.check_value()));
        assert_ne!(a.digest(b"x"), b.digest(b"x"));
        assert_ne!(a.digest(b"x"), a.digest(b"y"));
        assert_ne!(a.check_value(), a.digest(b""));
        assert_ne!(a.header_mac(b"x"), a.digest(b"x"));
        assert_ne!(a.header_mac(b"x"), a.manifest_mac(b"x"));
        assert_ne!(a.manifest_mac(b"x"), b.manifest_mac(b"x"));
        assert!(mac_eq(&a.header_mac(b"x"), &a.header_mac(b"x")));
        assert!(!format!("{a:?}").contains(&format!("{:?}", a.check_value())));
    }
}
