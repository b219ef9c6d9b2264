//! The precompiled-component cache under `<home>/cache`.
//!
//! Compiling a component costs from milliseconds (a small Rust guest) to
//! seconds (an 18 MB Python guest); loading the host's own precompiled
//! artifact costs microseconds to a few milliseconds. Entries are keyed by
//! the component's sha256 and the engine's compatibility hash, so a changed
//! file or a different wasmtime build never reuses an old entry.
//!
//! Deserializing an artifact is `unsafe`: wasmtime trusts it to be machine
//! code it wrote. So every entry carries the sha256 of its payload and is
//! verified before use; a corrupt, truncated or foreign entry is recompiled
//! and replaced, never loaded.

use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

const MAGIC: &[u8; 16] = b"sandboxer-cwasm1";
const DIGEST_LEN: usize = 32;

/// How a component was obtained, for reports and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheOutcome {
    /// Loaded from a verified cache entry.
    Hit,
    /// Compiled; the artifact was written to the cache.
    Compiled,
    /// A cache entry existed but failed verification; recompiled and replaced.
    Replaced,
}

#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    engine_key: String,
}

impl ArtifactCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut hasher = Sha256Hasher::default();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex::encode(&hasher.0.finalize()[..8]);
        Self { dir, engine_key }
    }

    /// The entry for a component with this content hash.
    pub fn entry_path(&self, content_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{content_sha256}-{}.cwasm", self.engine_key))
    }

    /// The compiled component for `wasm`, from the cache when a verified entry
    /// exists, else compiled and stored. Compile errors are the component's
    /// fault and are returned; cache I/O problems only cost a recompile.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        wasm: &[u8],
        content_sha256: &str,
    ) -> wasmtime::Result<(Component, CacheOutcome)> {
        let path = self.entry_path(content_sha256);
        let mut outcome = CacheOutcome::Compiled;
        match std::fs::read(&path) {
            Ok(entry) => match verified_payload(&entry) {
                Some(payload) => {
                    // SAFETY: the payload's digest matches the one this host
                    // wrote beside it, and only `store` below writes entries.
                    match unsafe { Component::deserialize(engine, payload) } {
                        Ok(component) => return Ok((component, CacheOutcome::Hit)),
                        Err(error) => {
                            tracing::warn!(path = %path.display(), "cache entry rejected by wasmtime, recompiling: {error:#}");
                            outcome = CacheOutcome::Replaced;
                        }
                    }
                }
                None => {
                    tracing::warn!(path = %path.display(), "cache entry is corrupt, recompiling");
                    outcome = CacheOutcome::Replaced;
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), "cannot read cache entry, recompiling: {error}")
            }
        }
        let component = Component::new(engine, wasm)?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(error) = self.store(&path, &artifact) {
                    tracing::warn!(path = %path.display(), "cannot write cache entry: {error}");
                }
            }
            Err(error) => tracing::warn!("cannot serialize compiled component: {error:#}"),
        }
        Ok((component, outcome))
    }

    /// Writes an entry atomically: a reader sees the old entry, no entry, or
    /// the whole new one.
    fn store(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut temporary = tempfile::NamedTempFile::new_in(&self.dir)?;
        temporary.write_all(MAGIC)?;
        temporary.write_all(&Sha256::digest(artifact))?;
        temporary.write_all(artifact)?;
        temporary.as_file().sync_all()?;
        temporary.persist(path).map_err(|error| error.error)?;
        Ok(())
    }
}

/// The payload of a well-formed entry whose digest matches, else none.
fn verified_payload(entry: &[u8]) -> Option<&[u8]> {
    let rest = entry.strip_prefix(MAGIC.as_slice())?;
    if rest.len() < DIGEST_LEN {
        return None;
    }
    let (digest, payload) = rest.split_at(DIGEST_LEN);
    (Sha256::digest(payload).as_slice() == digest).then_some(payload)
}

/// Feeds `Hash` output into sha256, so the engine key is stable across Rust
/// releases (std's `DefaultHasher` makes no such promise).
#[derive(Default)]
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// The hex sha256 of a component's bytes: its cache key and identity.
pub fn content_sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_must_match_its_digest() {
        let payload = b"machine code".as_slice();
        let mut entry = MAGIC.to_vec();
        entry.extend_from_slice(&Sha256::digest(payload));
        entry.extend_from_slice(payload);
        assert_eq!(verified_payload(&entry), Some(payload));

        let mut flipped = entry.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(verified_payload(&flipped), None, "a flipped bit is caught");
        assert_eq!(
            verified_payload(&entry[..entry.len() - 1]),
            None,
            "truncation is caught"
        );
        assert_eq!(verified_payload(&entry[..20]), None);
        assert_eq!(verified_payload(b""), None);
        assert_eq!(
            verified_payload(payload),
            None,
            "a raw wasmtime artifact is not trusted"
        );
    }
}
