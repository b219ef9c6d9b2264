//! Loading one `.wasm` file: every check an extension must pass, in order,
//! each failure a one-line reason.
//!
//! instance name (the file stem) → size cap → WebAssembly header
//! (component, not core module) → sidecar → compile or verified cache →
//! imports against grants → exports the `backend` interface →
//! pre-instantiate → `info()` under a short deadline
//! (or its answer kept in the cache for this component and sidecar) →
//! plausible info.
//!
//! A cached load reads the file's first bytes and its identity, not the
//! whole file: the cache remembers each version's digest (see `cache.rs`).

use super::bindings::SelfHostedExtensionPre;
use super::bindings::sandboxer::extension::types::ExtensionInfo;
use super::cache::{CacheOutcome, Lookup, content_sha256, info_inputs_sha256};
use super::capabilities::check_imports;
use super::egress::EgressPolicy;
use super::error::one_line;
use super::extension::{Extension, Invoker};
use super::file_identity::{FileIdentity, ObservedDigest, now_ns};
use super::http_client::HttpCapability;
use super::network::NetworkPolicy;
use super::process::ProcessCapability;
use super::secrets::Secrets;
use super::sidecar::{INFO_TIMEOUT_MS, Sidecar};
use super::{CompileStage, Runtime};
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Largest `.wasm` file the host will read.
pub const MAX_COMPONENT_BYTES: u64 = 256 * 1024 * 1024;

const WASM_MAGIC: &[u8] = b"\0asm";
const CORE_MODULE_VERSION: [u8; 4] = [0x01, 0x00, 0x00, 0x00];
const COMPONENT_LAYER: [u8; 2] = [0x01, 0x00];
const BACKEND_EXPORT_PREFIX: &str = "sandboxer:extension/backend@0.1.";

/// The sidecar of `path`: `<stem>.toml` beside it.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("toml")
}

/// The instance name of `path`: its file stem.
pub fn instance_name(path: &Path) -> String {
    path.file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A file that passed every check that needs no call of the guest: what
/// [`finish`] completes with `info()`.
pub(super) struct Prepared {
    name: String,
    file: PathBuf,
    sidecar: Sidecar,
    imports: Vec<super::capabilities::ImportedInterface>,
    sha256: String,
    cache: CacheOutcome,
    invoker: Invoker,
    /// The key of the kept `info()` answer, and the answer when it is kept.
    inputs_sha256: String,
    kept_info: Option<ExtensionInfo>,
}

/// Every check up to `info()`: reading, the header, the sidecar, compiling
/// (or the verified cache), imports and exports, pre-instantiation. CPU and
/// disk bound: the async loader runs it on a blocking thread.
pub(super) fn prepare(runtime: &Runtime, path: &Path) -> Result<Prepared, String> {
    let name = instance_name(path);
    // Profiles, sandbox records and ledger accounts name an instance by its
    // stem: a stem outside the name rule would load as an instance nothing
    // can name (or one that breaks a file name or an account key).
    crate::names::check_name("extension", &name).map_err(|reason| {
        format!("{reason} (an instance is named by its file stem: rename the file)")
    })?;
    // Taken before the file is looked at: a digest remembered from this read
    // can only vouch for versions that had settled by then.
    let observed_ns = now_ns();
    let mut file = File::open(path).map_err(|error| format!("cannot read: {error}"))?;
    let identity = FileIdentity::of(
        &file
            .metadata()
            .map_err(|error| format!("cannot read: {error}"))?,
    );
    let size = identity.size;
    if size == 0 {
        return Err("empty file: not a WebAssembly component".into());
    }
    if size > MAX_COMPONENT_BYTES {
        return Err(format!(
            "{size} bytes is over the {MAX_COMPONENT_BYTES}-byte limit for a component"
        ));
    }
    let mut header = Vec::with_capacity(8);
    (&mut file)
        .take(8)
        .read_to_end(&mut header)
        .map_err(|error| format!("cannot read: {error}"))?;
    check_header(&header)?;

    let sidecar_file = sidecar_path(path);
    let sidecar_text = match std::fs::read_to_string(&sidecar_file) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            return Err(format!(
                "bad sidecar {}: cannot read: {error}",
                sidecar_file.display()
            ));
        }
    };
    let sidecar = match &sidecar_text {
        Some(text) => Sidecar::parse(text, &sidecar_file),
        None => Ok(Sidecar::default()),
    }
    .map_err(|error| format!("bad sidecar {error}"))?;

    // The whole file is read and hashed only when this version of it was
    // not seen before (or its artifact must be compiled).
    let mut bytes = None;
    let mut sha256 = match runtime.cache.remembered_source(&identity) {
        Some(sha256) => sha256,
        None => {
            let read = read_whole(&mut file, size)?;
            let sha256 = content_sha256(&read);
            runtime.cache.remember_source(&ObservedDigest {
                identity,
                sha256: sha256.clone(),
                observed_ns,
            });
            bytes = Some(read);
            sha256
        }
    };
    let invalid = |error: wasmtime::Error| {
        format!(
            "invalid component: {}",
            one_line(&format!("{error:#}"), 300)
        )
    };
    let (component, cache) = match runtime.cache.lookup(&runtime.engine, &sha256) {
        Lookup::Hit(component) => (component, CacheOutcome::Hit),
        lookup => {
            let bytes = match bytes {
                Some(bytes) => bytes,
                None => {
                    // Key the artifact by what is compiled, whatever the
                    // remembered digest said.
                    let read = read_whole(&mut file, size)?;
                    sha256 = content_sha256(&read);
                    read
                }
            };
            let outcome = match lookup {
                Lookup::Missing => CacheOutcome::Compiled,
                _ => CacheOutcome::Replaced,
            };
            let file_name = path.display().to_string();
            if let Some(notice) = &runtime.on_compile {
                notice(&file_name, CompileStage::Started);
            }
            let compiled = runtime
                .cache
                .compile_and_store(&runtime.engine, &bytes, &sha256);
            if let Some(notice) = &runtime.on_compile {
                notice(&file_name, CompileStage::Finished);
            }
            (compiled.map_err(invalid)?, outcome)
        }
    };

    let component_type = component.component_type();
    let import_names: Vec<&str> = component_type
        .imports(&runtime.engine)
        .map(|(name, _)| name)
        .collect();
    let imports = check_imports(import_names, &sidecar.grants)?;

    let export_names: Vec<&str> = component_type
        .exports(&runtime.engine)
        .map(|(name, _)| name)
        .collect();
    if !export_names
        .iter()
        .any(|name| name.starts_with(BACKEND_EXPORT_PREFIX))
    {
        let exported = if export_names.is_empty() {
            "nothing".to_string()
        } else {
            export_names.join(", ")
        };
        return Err(format!(
            "not a sandbox-extension component: it exports {exported}, not sandboxer:extension/backend@0.1.0"
        ));
    }

    let instance_pre = runtime
        .linker
        .instantiate_pre(&component)
        .map_err(|error| format!("cannot link: {}", one_line(&format!("{error:#}"), 300)))?;
    let pre = SelfHostedExtensionPre::new(instance_pre).map_err(|error| {
        format!(
            "not a sandbox-extension component: {}",
            one_line(&format!("{error:#}"), 300)
        )
    })?;

    let process = if sidecar.grants.process.is_empty() {
        None
    } else {
        let settings = runtime.processes.clone().ok_or_else(|| {
            "granted `process`, but this host runs without the process capability".to_string()
        })?;
        Some(Arc::new(ProcessCapability::new(
            settings,
            &sidecar.grants.process,
        )))
    };
    let invoker = Invoker {
        name: Arc::from(name.as_str()),
        engine: runtime.engine.clone(),
        component,
        pre,
        state: runtime.state.clone(),
        config: Arc::new(sidecar.config.clone()),
        limits: sidecar.limits.clone(),
        network: Arc::new(NetworkPolicy::from_grants(&sidecar.grants.network)),
        process,
        http: (!sidecar.grants.http.is_empty()).then(|| {
            Arc::new(HttpCapability::new(
                EgressPolicy::new(&sidecar.grants.http),
                Secrets::resolve(&sidecar.grants.secrets),
                &sidecar.limits,
            ))
        }),
        idle: sidecar
            .limits
            .reuse_instances
            .then(|| std::sync::Mutex::new(Vec::new())),
        _ticker: runtime.ticker.clone(),
        stats: Arc::default(),
    };
    // info() is a declaration: a function of the component and what its
    // sidecar gives it (docs/extensions.md). Its answer is kept beside the
    // artifact and the call is made again only for a new component, a
    // changed sidecar or another instance name.
    let inputs_sha256 = info_inputs_sha256(&name, sidecar_text.as_deref());
    let kept_info = runtime.cache.remembered_info(&sha256, &inputs_sha256);
    Ok(Prepared {
        name,
        file: path.to_path_buf(),
        sidecar,
        imports,
        sha256,
        cache,
        invoker,
        inputs_sha256,
        kept_info,
    })
}

/// The last check: `info()` under a short deadline (or its kept answer),
/// and a plausible answer.
pub(super) async fn finish(runtime: &Runtime, prepared: Prepared) -> Result<Extension, String> {
    let Prepared {
        name,
        file,
        sidecar,
        imports,
        sha256,
        cache,
        invoker,
        inputs_sha256,
        kept_info,
    } = prepared;
    let info = match kept_info {
        Some(info) => info,
        None => {
            let info_timeout =
                Duration::from_millis(INFO_TIMEOUT_MS.min(sidecar.limits.timeout_ms));
            let info = invoker
                .info(info_timeout)
                .await
                .map_err(|error| format!("info() failed: {error}"))?;
            check_info(&info)?;
            runtime.cache.remember_info(&sha256, &inputs_sha256, &info);
            info
        }
    };
    check_info(&info)?;

    Ok(Extension {
        name,
        file,
        info,
        limits: sidecar.limits,
        grants: sidecar.grants,
        routing: sidecar.routing,
        billing: sidecar.billing,
        config: sidecar.config,
        imports,
        content_sha256: sha256,
        cache,
        invoker,
    })
}

/// The whole file, from its start, through the descriptor whose identity
/// was taken.
fn read_whole(file: &mut File, size: u64) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::with_capacity(size as usize);
    file.rewind()
        .and_then(|()| {
            file.by_ref()
                .take(MAX_COMPONENT_BYTES + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(|error| format!("cannot read: {error}"))?;
    if bytes.len() as u64 > MAX_COMPONENT_BYTES {
        return Err(format!(
            "{} bytes is over the {MAX_COMPONENT_BYTES}-byte limit for a component",
            bytes.len()
        ));
    }
    Ok(bytes)
}

fn check_header(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
        let shown: Vec<String> = bytes
            .iter()
            .take(4)
            .map(|byte| format!("{byte:02x}"))
            .collect();
        return Err(format!(
            "not WebAssembly: it starts with bytes [{}], not the \\0asm magic",
            shown.join(" ")
        ));
    }
    if bytes[4..8] == CORE_MODULE_VERSION {
        return Err("a core WebAssembly module, not a component: build it for wasm32-wasip2, or wrap it with `wasm-tools component new`".into());
    }
    if bytes[6..8] != COMPONENT_LAYER {
        return Err(format!(
            "unknown WebAssembly encoding (version bytes {:02x?})",
            &bytes[4..8]
        ));
    }
    Ok(())
}

/// Longest id `info()` may return.
pub const MAX_INFO_ID_BYTES: usize = 64;
/// Longest version `info()` may return.
pub const MAX_INFO_VERSION_BYTES: usize = 64;
/// Longest description `info()` may return.
pub const MAX_INFO_DESCRIPTION_BYTES: usize = 1000;

/// Sizes first, so a huge field is refused by its length, never copied into
/// the reason.
fn check_info(info: &ExtensionInfo) -> Result<(), String> {
    for (field, size, limit) in [
        ("an id", info.id.len(), MAX_INFO_ID_BYTES),
        ("a version", info.version.len(), MAX_INFO_VERSION_BYTES),
        (
            "a description",
            info.description.len(),
            MAX_INFO_DESCRIPTION_BYTES,
        ),
    ] {
        if size > limit {
            return Err(format!(
                "info() returned {field} of {size} bytes; the limit is {limit}"
            ));
        }
    }
    let id_ok = !info.id.is_empty()
        && info.id.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-_.".contains(&byte)
        });
    if !id_ok {
        return Err(format!(
            "info() returned an invalid id {:?}: use 1 to {MAX_INFO_ID_BYTES} characters of a-z, 0-9, '-', '_' or '.'",
            info.id
        ));
    }
    if info.version.is_empty() {
        return Err(format!(
            "info() returned an empty version; expected 1 to {MAX_INFO_VERSION_BYTES} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_tell_components_from_modules_and_junk() {
        assert!(check_header(b"\0asm\x0d\x00\x01\x00rest").is_ok());
        assert!(
            check_header(b"\0asm\x01\x00\x00\x00")
                .unwrap_err()
                .contains("core WebAssembly module")
        );
        assert!(
            check_header(b"MZ\x90\x00\x03\x00\x00\x00")
                .unwrap_err()
                .contains("[4d 5a 90 00]")
        );
        assert!(
            check_header(b"\0as")
                .unwrap_err()
                .contains("not WebAssembly")
        );
    }

    #[test]
    fn info_fields_are_refused_by_their_size_first() {
        let info = |id: &str, version: &str, description: &str| ExtensionInfo {
            id: id.into(),
            version: version.into(),
            kind: super::super::BackendKind::Saas,
            description: description.into(),
        };
        assert!(check_info(&info("ok-1", "0.1.0", "fine")).is_ok());
        for (bad, reason) in [
            (
                info(&"x ".repeat(1 << 20), "0.1.0", ""),
                "info() returned an id of 2097152 bytes; the limit is 64",
            ),
            (
                info("ok", &"1".repeat(65), ""),
                "info() returned a version of 65 bytes; the limit is 64",
            ),
            (
                info("ok", "1", &"d".repeat(1001)),
                "info() returned a description of 1001 bytes; the limit is 1000",
            ),
            (
                info("Bad Id", "1", ""),
                "info() returned an invalid id \"Bad Id\": use 1 to 64 characters",
            ),
            (info("", "1", ""), "info() returned an invalid id \"\""),
            (info("ok", "", ""), "info() returned an empty version"),
        ] {
            let error = check_info(&bad).unwrap_err();
            assert!(error.starts_with(reason), "{error}");
        }
    }

    #[test]
    fn instance_name_is_the_file_stem() {
        assert_eq!(instance_name(Path::new("/x/cheap.wasm")), "cheap");
        assert_eq!(
            sidecar_path(Path::new("/x/cheap.wasm")),
            Path::new("/x/cheap.toml")
        );
    }
}
