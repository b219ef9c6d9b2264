//! The precompiled cache's fast path and its guarantee: a cached load reads
//! neither the whole `.wasm` nor the whole artifact when their identities
//! (device, inode, size, mtime, ctime) are the ones verified before, and
//! still never runs a changed component or a corrupt artifact.
//!
//! The identities must have settled (be older than the cache's settle
//! window, 2 s) before the cache trusts them, so this test sleeps twice.

use crate::support::*;
use sandboxer_host::runtime::CacheOutcome;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, SystemTime};

const SETTLE: Duration = Duration::from_millis(2_100);

/// `wasm` with a custom section appended so that it is `size` bytes long:
/// the same component, padded.
fn padded_to(wasm: &[u8], size: usize) -> Vec<u8> {
    fn leb128(mut value: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                bytes.push(byte);
                return bytes;
            }
            bytes.push(byte | 0x80);
        }
    }
    let name = b"padding";
    for payload in 0..size {
        let content = 1 + name.len() + payload;
        let section = 1 + leb128(content).len() + content;
        if wasm.len() + section == size {
            let mut padded = wasm.to_vec();
            padded.push(0);
            padded.extend(leb128(content));
            padded.push(name.len() as u8);
            padded.extend_from_slice(name);
            padded.resize(size, b'p');
            return padded;
        }
    }
    panic!("cannot pad {} bytes to {size}", wasm.len());
}

fn set_mtime(path: &Path, when: SystemTime) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

#[tokio::test]
async fn a_same_size_same_mtime_rewrite_and_a_corrupt_artifact_are_never_run_from_the_cache() {
    let home = TestHome::new();
    std::fs::create_dir_all(home.extensions()).unwrap();
    let stub = std::fs::read(built_extensions().join("saas-stub.wasm")).unwrap();
    let flat_fee = std::fs::read(built_examples().join("flat-fee.wasm")).unwrap();
    let size = stub.len().max(flat_fee.len()) + 64;
    let (first, second) = (padded_to(&stub, size), padded_to(&flat_fee, size));
    let file = home.extensions().join("backend.wasm");
    let an_old_time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    std::fs::write(&file, &first).unwrap();
    set_mtime(&file, an_old_time);
    let load = async || {
        home.runtime()
            .load_dir(&home.extensions())
            .await
            .unwrap()
            .get("backend")
            .unwrap()
            .clone()
    };

    std::thread::sleep(SETTLE);
    let loaded = load().await;
    assert_eq!(loaded.cache, CacheOutcome::Compiled);
    assert_eq!(loaded.info.id, "saas-stub");
    std::thread::sleep(SETTLE);
    // The artifact has settled: verified once more by its digest, then
    // trusted by its identity.
    assert_eq!(load().await.cache, CacheOutcome::Hit);
    let loaded = load().await;
    assert_eq!(loaded.cache, CacheOutcome::Hit);
    assert_eq!(loaded.info.id, "saas-stub");

    // Corrupt the artifact in place, keeping its size and mtime.
    let artifact = home.runtime().cache_entry_path(&loaded.content_sha256);
    let artifact_mtime = std::fs::metadata(&artifact).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&artifact, &bytes).unwrap();
    set_mtime(&artifact, artifact_mtime);
    let reloaded = load().await;
    assert_eq!(
        reloaded.cache,
        CacheOutcome::Replaced,
        "a corrupt artifact is rejected and recompiled"
    );
    assert_eq!(
        reloaded.estimate_cost(&spec("sbx-a")).await.unwrap().amount,
        loaded.estimate_cost(&spec("sbx-a")).await.unwrap().amount,
        "the recompiled component works"
    );

    // Another component of the same size, with the old mtime put back: only
    // the ctime (which every write sets) tells the versions apart.
    std::fs::write(&file, &second).unwrap();
    set_mtime(&file, an_old_time);
    let metadata = std::fs::metadata(&file).unwrap();
    assert_eq!(metadata.len() as usize, size);
    assert_eq!(metadata.modified().unwrap(), an_old_time);
    let replaced = load().await;
    assert_eq!(
        replaced.info.id, "flat-fee",
        "the new component runs, not the old one's artifact"
    );
    assert_ne!(replaced.content_sha256, loaded.content_sha256);
    assert_ne!(
        replaced.estimate_cost(&spec("sbx-b")).await.unwrap().amount,
        loaded.estimate_cost(&spec("sbx-b")).await.unwrap().amount,
        "a different backend answers"
    );
}
