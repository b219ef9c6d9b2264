//! The precompiled-component cache: one directory per user (see
//! [`crate::paths::default_cache_dir`]), shared by every home and process.
//!
//! Compiling a component costs from milliseconds (a small Rust guest) to
//! seconds (an 18 MB Python guest); mapping the host's own precompiled
//! artifact costs microseconds to a couple of milliseconds. Entries are
//! keyed by the component's sha256 and the engine's compatibility hash, so a
//! changed file or a different wasmtime build never reuses an old entry.
//!
//! Deserializing an artifact is `unsafe`: wasmtime trusts it to be machine
//! code it wrote. So every artifact has a digest record written by this
//! host beside it, and is deserialized only when its content matches that
//! digest: a corrupt, truncated or foreign artifact is recompiled and
//! replaced, never loaded. Hashing tens of megabytes on every load would
//! cost more than the load itself, so the record also remembers the
//! artifact's file identity when it was last verified, and an artifact with
//! that identity is not hashed again (see [`super::file_identity`] for why
//! an identity cannot stay the same across a write). The same trick spares
//! hashing the `.wasm` file itself: `sources/` remembers each file's digest
//! against its identity.
//!
//! Layout:
//! ```text
//! <sha256>-<engine>.cwasm         the artifact, exactly as wasmtime serialized it (mapped, not copied)
//! <sha256>-<engine>.cwasm.digest  its sha256 and the identity it was last verified at
//! sources/<device>-<inode>.json   a .wasm file's sha256 and the identity it was read at
//! info/<sha256>-<engine>-<inputs>.json   what info() answered for this component and sidecar
//! ```

use super::bindings::sandboxer::extension::types::ExtensionInfo;
use super::file_identity::{FileIdentity, ObservedDigest, now_ns, write_atomically};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

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

/// What the cache holds for one component.
pub enum Lookup {
    /// A verified artifact, deserialized.
    Hit(Component),
    /// No artifact: compile.
    Missing,
    /// An artifact that failed verification (or that wasmtime refused):
    /// compile and replace it.
    Untrusted,
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

    /// The artifact of a component with this content hash.
    pub fn entry_path(&self, content_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{content_sha256}-{}.cwasm", self.engine_key))
    }

    fn digest_path(&self, content_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{content_sha256}-{}.cwasm.digest", self.engine_key))
    }

    fn source_path(&self, identity: &FileIdentity) -> PathBuf {
        self.dir
            .join("sources")
            .join(format!("{}.json", identity.file_key()))
    }

    fn info_path(&self, content_sha256: &str, inputs_sha256: &str) -> PathBuf {
        self.dir.join("info").join(format!(
            "{content_sha256}-{}-{inputs_sha256}.json",
            self.engine_key
        ))
    }

    /// The sha256 of a `.wasm` file whose identity is `identity`, when this
    /// cache read that very version of it before.
    pub fn remembered_source(&self, identity: &FileIdentity) -> Option<String> {
        ObservedDigest::read(&self.source_path(identity))
            .filter(|record| record.vouches_for(identity))
            .map(|record| record.sha256)
    }

    /// Remembers a `.wasm` file's digest (when it can ever vouch).
    pub fn remember_source(&self, record: &ObservedDigest) {
        if record.is_settled()
            && let Err(error) = record.write(&self.source_path(&record.identity))
        {
            tracing::debug!("cannot remember a component's digest: {error}");
        }
    }

    /// The verified artifact of the component with this digest, if any.
    pub fn lookup(&self, engine: &Engine, content_sha256: &str) -> Lookup {
        let path = self.entry_path(content_sha256);
        let observed_ns = now_ns();
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Lookup::Missing,
            Err(error) => {
                tracing::warn!(path = %path.display(), "cannot read cache entry, recompiling: {error}");
                return Lookup::Untrusted;
            }
        };
        let identity = match file.metadata() {
            Ok(metadata) => FileIdentity::of(&metadata),
            Err(error) => {
                tracing::warn!(path = %path.display(), "cannot stat cache entry, recompiling: {error}");
                return Lookup::Untrusted;
            }
        };
        let digest_path = self.digest_path(content_sha256);
        let Some(record) = ObservedDigest::read(&digest_path) else {
            tracing::warn!(path = %path.display(), "cache entry has no digest record, recompiling");
            return Lookup::Untrusted;
        };
        let deserialized = if record.vouches_for(&identity) {
            // SAFETY: this very version of the file (same inode, size, mtime
            // and ctime, settled before it was verified) matched the digest
            // this host wrote when it stored the artifact; only `store` writes
            // artifacts. The file is mapped through the descriptor opened
            // above, so a rename in between cannot swap it.
            unsafe { Component::deserialize_file(engine, open_file_path(&file, &path)) }
        } else {
            let mut artifact = Vec::with_capacity(identity.size as usize);
            if let Err(error) = file.read_to_end(&mut artifact) {
                tracing::warn!(path = %path.display(), "cannot read cache entry, recompiling: {error}");
                return Lookup::Untrusted;
            }
            if hex::encode(Sha256::digest(&artifact)) != record.sha256 {
                tracing::warn!(path = %path.display(), "cache entry is corrupt, recompiling");
                return Lookup::Untrusted;
            }
            let verified = ObservedDigest {
                identity,
                sha256: record.sha256.clone(),
                observed_ns,
            };
            if verified.is_settled()
                && let Err(error) = verified.write(&digest_path)
            {
                tracing::debug!("cannot update a cache digest record: {error}");
            }
            // SAFETY: these bytes match the digest this host wrote when it
            // stored the artifact; only `store` writes artifacts.
            unsafe { Component::deserialize(engine, &artifact) }
        };
        match deserialized {
            Ok(component) => Lookup::Hit(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), "cache entry rejected by wasmtime, recompiling: {error:#}");
                Lookup::Untrusted
            }
        }
    }

    /// Compiles `wasm` and stores its artifact. Compile errors are the
    /// component's fault and are returned; cache I/O problems only cost a
    /// recompile next time.
    pub fn compile_and_store(
        &self,
        engine: &Engine,
        wasm: &[u8],
        content_sha256: &str,
    ) -> wasmtime::Result<Component> {
        let component = Component::new(engine, wasm)?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(error) = self.store(content_sha256, &artifact) {
                    tracing::warn!(dir = %self.dir.display(), "cannot write cache entry: {error}");
                }
            }
            Err(error) => tracing::warn!("cannot serialize compiled component: {error:#}"),
        }
        Ok(component)
    }

    /// Writes the artifact atomically and durably, then its digest record:
    /// a reader sees no artifact, or one that its record vouches for or
    /// that fails verification (and is replaced), never an unverified one.
    fn store(&self, content_sha256: &str, artifact: &[u8]) -> std::io::Result<()> {
        let path = self.entry_path(content_sha256);
        write_atomically(&path, artifact, true)?;
        let observed_ns = now_ns();
        let identity = FileIdentity::of(&std::fs::metadata(&path)?);
        // Just written, the identity is not settled yet: the next load
        // hashes the artifact once more and records a settled identity.
        let record = ObservedDigest {
            identity,
            sha256: hex::encode(Sha256::digest(artifact)),
            observed_ns,
        };
        record.write(&self.digest_path(content_sha256))
    }

    /// What `info()` answered for this component under sidecar inputs with
    /// this digest, if it was asked before.
    pub fn remembered_info(
        &self,
        content_sha256: &str,
        inputs_sha256: &str,
    ) -> Option<ExtensionInfo> {
        let text = std::fs::read(self.info_path(content_sha256, inputs_sha256)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn remember_info(&self, content_sha256: &str, inputs_sha256: &str, info: &ExtensionInfo) {
        let written = serde_json::to_vec(info)
            .map_err(std::io::Error::other)
            .and_then(|json| {
                write_atomically(&self.info_path(content_sha256, inputs_sha256), &json, false)
            });
        if let Err(error) = written {
            tracing::debug!("cannot remember an extension's info: {error}");
        }
    }
}

/// A path that opens the very file behind `file`: its descriptor under
/// /proc where there is one, else `path`.
fn open_file_path(file: &File, path: &Path) -> PathBuf {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let by_descriptor = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if by_descriptor.exists() {
            return by_descriptor;
        }
    }
    let _ = file;
    path.to_path_buf()
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

/// The hex sha256 of what `info()` can see besides the component: the
/// instance name and its sidecar's text (config, limits and grants).
pub fn info_inputs_sha256(instance: &str, sidecar_text: Option<&str>) -> String {
    let mut hasher = Sha256::new();
    hasher.update((instance.len() as u64).to_le_bytes());
    hasher.update(instance.as_bytes());
    match sidecar_text {
        Some(text) => {
            hasher.update([1]);
            hasher.update(text.as_bytes());
        }
        None => hasher.update([0]),
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_inputs_tell_names_and_sidecars_apart() {
        let plain = info_inputs_sha256("stub", None);
        assert_ne!(plain, info_inputs_sha256("stub", Some("")));
        assert_ne!(plain, info_inputs_sha256("stub2", None));
        assert_ne!(
            info_inputs_sha256("stub", Some("[config]\nrate = \"1\"\n")),
            info_inputs_sha256("stub", Some("[config]\nrate = \"2\"\n"))
        );
    }
}
